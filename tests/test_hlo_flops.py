"""plan/flops.py's hlo_flops: FLOPs of compiled programs against hand-derived counts, loops included
(XLA's own cost analysis counts a loop body once)."""
import jax
import jax.numpy as jnp
import pytest

from plan import hlo_flops, libtpu_available

LAYERS, B, D, F, H = 5, 8, 128, 256, 4
# a scan of LAYERS matmuls [B, D] x [D, D], then a batched [H, B, D] x [H, D, F] product
WANT = LAYERS * 2 * B * D * D + 2 * H * B * D * F


def program(x, ws, v):
    x, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
    return jnp.einsum("hbd,hdf->hbf", jnp.broadcast_to(x, (H, B, D)), v)


ARGS = (jax.ShapeDtypeStruct((B, D), jnp.float32), jax.ShapeDtypeStruct((LAYERS, D, D), jnp.float32),
        jax.ShapeDtypeStruct((H, D, F), jnp.float32))


def test_cpu_program_loops_counted():
    compiled = jax.jit(program).lower(*ARGS).compile()
    flops, unknown = hlo_flops(compiled.as_text())
    assert flops == WANT and unknown == 0


@pytest.mark.tpu_aot
@pytest.mark.skipif(not libtpu_available(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_tpu_program_convolutions_counted(monkeypatch):
    """libtpu writes matmuls as convolutions (batch dims as dilated windows): same count."""
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
    mesh = jax.sharding.Mesh([devices[0]], ("x",))
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, PartitionSpec())) for a in ARGS]
    compiled = jax.jit(program).lower(*args).compile()
    flops, unknown = hlo_flops(compiled.as_text())
    assert flops == WANT and unknown == 0


def test_loops_with_wide_tuples_are_parsed():
    """A loop carrying 6+ values: XLA writes its tuple shape with /*index=5*/ comments."""
    def wide(x, ws):
        def body(c, w):
            return (jnp.tanh(c[0] @ w),) + tuple(v * (i + 2.0) + c[0][0, :3] for i, v in enumerate(c[1:])), None
        carry = (x,) + tuple(jnp.full((3,), float(i)) for i in range(5))
        return jax.lax.scan(body, carry, ws)[0]

    compiled = jax.jit(wide).lower(*ARGS[:2]).compile()
    assert "/*index=5*/" in compiled.as_text()
    flops, unknown = hlo_flops(compiled.as_text())
    assert flops == LAYERS * 2 * B * D * D and unknown == 0


@pytest.mark.tpu_aot
@pytest.mark.skipif(not libtpu_available(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_pallas_kernel_flops_apart(monkeypatch):
    """The megablox grouped matmul compiled for a TPU is a custom call stating 2 m k n FLOPs for
    its whole row buffer (whatever the group sizes): counted as kernel FLOPs, not dots."""
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    from model.gmm import grouped_matmul
    from plan import count_hlo_flops

    devices = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
    at = NamedSharding(jax.sharding.Mesh([devices[0]], ("x",)), PartitionSpec())
    m, k, n, e = 256, 128, 256, 4
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=at),
            jax.ShapeDtypeStruct((e, k, n), jnp.bfloat16, sharding=at),
            jax.ShapeDtypeStruct((e,), jnp.int32, sharding=at))
    fn = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, "megablox", jnp.float32))
    with jax.default_matmul_precision("default"):  # Mosaic refuses bf16 operands at "highest" (conftest)
        counted = count_hlo_flops(fn.lower(*args).compile().as_text())
    assert (counted.dots, counted.kernels, counted.unknown) == (0, 2 * m * k * n, 0)
