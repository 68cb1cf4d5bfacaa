"""Pieces with hand-written backward passes (mHC in model/hyper.py, SwiGLU in model/moe.py)
against JAX's autodiff of the plain formulas; Sinkhorn against a float64 NumPy run of the
reference kernel's order."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import hyper

B, S, N, D = 2, 3, 4, 8


def _inputs(dtype):
    k = jax.random.split(jax.random.key(0), 5)
    return {"y": jax.random.normal(k[0], (B, S, D)).astype(dtype),
            "x": jax.random.normal(k[1], (B, S, N, D)).astype(dtype),
            "post": jax.random.uniform(k[2], (B, S, N), minval=0.0, maxval=2.0),
            "comb": jax.nn.softmax(jax.random.normal(k[3], (B, S, N, N)), -1),
            "g": jax.random.normal(k[4], (B, S, N, D)).astype(dtype)}


def _plain_merge(y, x, post, comb):  # the formula, differentiated by JAX
    f32 = jnp.float32
    out = post[..., None] * y.astype(f32)[..., None, :] + jnp.einsum(
        "bsjk,bsjd->bskd", comb, x.astype(f32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


def _plain_collapse(pre, x):
    return jnp.einsum("bsn,bsnd->bsd", pre, x.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_and_collapse_gradients_equal_autodiff(dtype):
    a = _inputs(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    cases = [(hyper.merge, _plain_merge, (a["y"], a["x"], a["post"], a["comb"]), a["g"]),
             (hyper.collapse, _plain_collapse, (a["post"], a["x"]), a["y"])]
    for fn, plain, args, g in cases:
        out, vjp = jax.jit(lambda *p, fn=fn: jax.vjp(fn, *p))(*args)
        ref, ref_vjp = jax.vjp(plain, *args)
        assert out.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
        for got, want, primal in zip(vjp(g), ref_vjp(g), args):
            assert got.dtype == primal.dtype and got.shape == primal.shape
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       rtol=tol, atol=tol)


def _sinkhorn_f64(logits, iters, eps):
    """The reference kernel's order in float64: row softmax + eps, a column normalisation,
    then (row, column) iters - 1 times."""
    z = np.exp(logits - logits.max(-1, keepdims=True))
    c = z / z.sum(-1, keepdims=True) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return c


def test_sinkhorn_equals_float64_reference_and_its_gradient_autodiff():
    logits = 3.0 * jax.random.normal(jax.random.key(1), (B, S, N, N))
    got = hyper.sinkhorn(logits, 20, 1e-6)
    np.testing.assert_allclose(got, _sinkhorn_f64(np.asarray(logits, np.float64), 20, 1e-6), rtol=2e-6, atol=1e-7)
    # near doubly stochastic: every column sums to 1 after the last (column) step
    np.testing.assert_allclose(np.asarray(got).sum(-2), 1.0, atol=1e-5)

    def unrolled(lg):  # the same iteration on the [..., N, N] layout, unrolled
        c = jax.nn.softmax(lg, -1) + 1e-6
        c = c / (c.sum(-2, keepdims=True) + 1e-6)
        for _ in range(19):
            c = c / (c.sum(-1, keepdims=True) + 1e-6)
            c = c / (c.sum(-2, keepdims=True) + 1e-6)
        return c

    w = jax.random.normal(jax.random.key(2), logits.shape)
    grad = jax.grad(lambda lg: jnp.sum(hyper.sinkhorn(lg, 20, 1e-6) * w))(logits)
    want = jax.grad(lambda lg: jnp.sum(unrolled(lg) * w))(logits)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


def test_swiglu_gradient_equals_autodiff_away_from_the_clamp_edges():
    from model.moe import swiglu

    k = jax.random.split(jax.random.key(3), 3)
    gate, up = 6.0 * jax.random.normal(k[0], (64, 16)), 6.0 * jax.random.normal(k[1], (64, 16))
    w = jax.random.normal(k[2], (64, 16))
    for limit in (0.0, 7.0):  # 7: some entries clamped on each side, none on the edge
        def plain(g, u, limit=limit):
            if limit > 0:
                g, u = jnp.minimum(g, limit), jnp.clip(u, -limit, limit)
            return jax.nn.silu(g) * u
        np.testing.assert_allclose(swiglu(gate, up, limit), plain(gate, up), rtol=1e-6, atol=1e-6)
        got = jax.grad(lambda g, u: jnp.sum(swiglu(g, u, limit) * w), argnums=(0, 1))(gate, up)
        want = jax.grad(lambda g, u: jnp.sum(plain(g, u) * w), argnums=(0, 1))(gate, up)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert bool(jnp.any(jnp.abs(up) > 7.0)) and bool(jnp.any(gate > 7.0))
