"""Grouped matmuls (model/gmm.py): every implementation equals the dense oracle, forward and
gradients, on uneven groups with empty groups and rows past the last group."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import gmm
from model.gmm import choose_impl, grouped_matmul


def _problem(m, d, f, e, unused, seed=0):
    """x [m, d], w [e, d, f], group sizes summing to m - unused with group 1 empty."""
    kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, d), jnp.float32)
    w = jax.random.normal(kw, (e, d, f), jnp.float32)
    sizes = np.bincount(np.asarray(jax.random.randint(ks, (m - unused,), 0, e)), minlength=e)
    sizes[0] += sizes[1]
    sizes[1] = 0
    return x, w, jnp.asarray(sizes, jnp.int32)


def _loss(impl):
    # a nonlinear loss so that every output row gets its own cotangent
    return lambda x, w, s: jnp.sum(jnp.sin(grouped_matmul(x, w, s, impl)))


@pytest.mark.parametrize("m,d,f,e,unused", [(300, 16, 24, 8, 13), (1024, 32, 16, 4, 0), (7, 4, 4, 3, 2)])
@pytest.mark.parametrize("impl", ["ragged", "tiled", "batched", "blocked", "tokamax"])
def test_matches_dense(m, d, f, e, unused, impl):
    x, w, sizes = _problem(m, d, f, e, unused)
    want = grouped_matmul(x, w, sizes, "dense")
    got = jax.jit(lambda *a: grouped_matmul(*a, impl))(x, w, sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got[m - unused:])), "rows past the groups must be 0"
    # and the float64 product of each row with its own group's matrix
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    group = np.repeat(np.arange(e), np.asarray(sizes))
    rows = np.einsum("md,mdf->mf", x64[:m - unused], w64[group])
    np.testing.assert_allclose(np.asarray(got[:m - unused]), rows, rtol=1e-4, atol=1e-4)
    g_want = jax.grad(_loss("dense"), argnums=(0, 1))(x, w, sizes)
    g_got = jax.jit(jax.grad(_loss(impl), argnums=(0, 1)))(x, w, sizes)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["tiled", "batched", "blocked", "ragged", "tokamax"])
def test_several_matrices_in_one_pass(impl):
    """grouped_matmuls(x, (w1, w3)): each output and the gradients of a loss mixing both equal
    the dense oracle's (the tiled backward sums both matrices' dx in one loop)."""
    x, w1, sizes = _problem(300, 16, 24, 8, 13)
    w3 = jax.random.normal(jax.random.key(5), w1.shape, jnp.float32)

    def loss(both):  # one call: its backward gets both outputs' cotangents at once
        def f(x, a, b):
            y1, y3 = both(x, a, b)
            return jnp.sum(jnp.sin(y1) * jnp.cos(y3))
        return f

    pair = lambda x, a, b: gmm.grouped_matmuls(x, (a, b), sizes, impl)  # noqa: E731
    dense = lambda x, a, b: [grouped_matmul(x, w, sizes, "dense") for w in (a, b)]  # noqa: E731
    for got, want in zip(jax.jit(pair)(x, w1, w3), dense(x, w1, w3)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want = jax.grad(loss(dense), (0, 1, 2))(x, w1, w3)
    for a, b in zip(jax.jit(jax.grad(loss(pair), (0, 1, 2)))(x, w1, w3), want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["tiled", "batched", "blocked"])
def test_low_precision_inputs_accumulate_in_float32(impl):
    x, w, sizes = _problem(200, 32, 16, 5, 3)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    got = grouped_matmul(xb, wb, sizes, impl, jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, grouped_matmul(xb, wb, sizes, "dense", jnp.float32), rtol=1e-5, atol=1e-4)
    dx, dw = jax.grad(lambda a, b: jnp.sum(grouped_matmul(a, b, sizes, impl, jnp.float32) ** 2), (0, 1))(xb, wb)
    assert dx.dtype == dw.dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", ["batched", "blocked"])
def test_a_group_of_every_row(impl):
    """"batched" runs ceil(largest group / C) passes of [E, C] blocks, "blocked" one pass and
    tiles for the rest: every row routed to one expert (here 7 passes of C = 40 rows, or 210
    rows past the block) is still exact, values and gradients."""
    x, w, _ = _problem(256, 16, 8, 8, 0)
    sizes = jnp.array([0, 0, 0, 250, 0, 0, 0, 0], jnp.int32)  # and 6 rows past the groups
    assert gmm.block_rows(256, 8) == 40
    got = jax.jit(lambda *a: grouped_matmul(*a, impl))(x, w, sizes)
    np.testing.assert_allclose(got, grouped_matmul(x, w, sizes, "dense"), rtol=1e-5, atol=1e-5)
    g_want = jax.grad(_loss("dense"), argnums=(0, 1))(x, w, sizes)
    for a, b in zip(jax.jit(jax.grad(_loss(impl), argnums=(0, 1)))(x, w, sizes), g_want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_megablox_kernel_in_interpreter():
    """The TPU kernel's numerics, run by Pallas' interpreter on the CPU (test_plan compiles it
    for a TPU slice)."""
    x, w, sizes = _problem(256, 128, 128, 4, 40)
    got = gmm._megablox(x, w, sizes, jnp.float32, interpret=True)
    np.testing.assert_allclose(got, grouped_matmul(x, w, sizes, "dense"), rtol=1e-5, atol=1e-4)


def test_auto_picks_per_platform(monkeypatch):
    # tokamax is in the test extra (on a GPU it brings the grouped kernels; `pip install '.[gpu]'`)
    assert [choose_impl("auto", p) for p in ("cpu", "tpu", "gpu")] == ["blocked", "megablox", "tokamax"]
    with monkeypatch.context() as mp:  # a GPU host without tokamax
        mp.setattr(gmm, "_has_tokamax", lambda: False)
        assert choose_impl("auto", "gpu") == "batched"
    assert choose_impl("ragged", "tpu") == "ragged"
    with pytest.raises(ValueError, match="no implementation 'x'"):
        grouped_matmul(jnp.zeros((2, 2)), jnp.zeros((1, 2, 2)), jnp.array([2]), "x")


def test_tokamax_kernel_that_does_not_build_falls_back_to_batched(monkeypatch):
    """A tokamax built for another jax fails while tracing (measured on a GPU: TypeError in its
    Mosaic kernel); the MoE warns and computes the exact product with "batched"."""
    class Broken:
        @staticmethod
        def ragged_dot(*args, **kwargs):
            raise TypeError("Mesh.__init__() got an unexpected keyword argument 'out_shape'")

    monkeypatch.setattr(gmm, "_tokamax", lambda: Broken)
    x, w, sizes = _problem(300, 16, 24, 8, 13)
    with pytest.warns(UserWarning, match="running 'batched' instead"):
        got = grouped_matmul(x, w, sizes, "tokamax")
    np.testing.assert_allclose(got, grouped_matmul(x, w, sizes, "dense"), rtol=1e-5, atol=1e-5)


def test_megablox_gradients_in_interpreter():
    """The TPU kernel's backward (its transposed kernels, in Pallas' interpreter): the weight
    gradient and the groups' rows of the input gradient equal the dense oracle's; the cotangent
    of rows past the groups goes to no weight."""
    x, w, sizes = _problem(256, 128, 128, 4, 40)
    n = int(jnp.sum(sizes))

    def loss(impl):
        f = (lambda a, b: gmm._megablox(a, b, sizes, jnp.float32, interpret=True)) if impl == "megablox" else (
            lambda a, b: grouped_matmul(a, b, sizes, "dense"))
        return lambda a, b: jnp.sum(jnp.sin(f(a, b)))

    (dx, dw), (dx_want, dw_want) = (jax.grad(loss(i), (0, 1))(x, w) for i in ("megablox", "dense"))
    np.testing.assert_allclose(dw, dw_want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dx[:n], dx_want[:n], rtol=1e-4, atol=1e-4)
