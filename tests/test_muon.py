"""Muon (train/muon.py): optax.contrib.muon's update, and the same on sharded meshes where
each device orthogonalises whole matrices it gathered by all_to_all."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

from model.transformer import build
from parallel import MeshConfig, Rules, make_mesh
from train.config import load_run_config
from train.optim import NS_COEFFS, make_optimizer, muon_partition, nest, schedule

from sizes import SMALL_OVERRIDES

TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    """The small model's parameters (tests/sizes.py), a random gradient of each (three steps' worth), and the
    parameters after our optimiser's three steps on one device."""
    cfg = load_run_config(TINY, ["optim.weight_decay=0.01", "optim.warmup_steps=0", "optim.clip_norm=0",
                                 *SMALL_OVERRIDES])
    params = nnx.state(build(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
    pure = nnx.to_pure_dict(params)
    rng = np.random.default_rng(1)  # numpy: no compile per leaf shape
    grads = [jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(p.dtype), pure) for _ in range(3)]
    ours = run(make_optimizer(cfg.optim, cfg.train.steps, params), pure, grads)  # one device
    return cfg, params, pure, grads, ours


def run(tx, params, grads, shardings=None):
    """Parameters after one update per gradient (jitted, optionally on pinned shardings)."""
    state = jax.jit(tx.init)(params)  # one compile, not one per eager operation and shape

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if shardings is None else jax.jit(step, out_shardings=(shardings, None))
    for g in grads:
        params, state = step(params, state, g)
    return params


def test_equals_optax_muon(tiny):
    """Our Muon partition against optax.contrib.muon (with AdamW for the other leaves) on one
    device: the same parameters after three steps."""
    cfg, params, pure, grads, got = tiny
    o = cfg.optim
    ref = optax.contrib.muon(schedule(o, cfg.train.steps), ns_coeffs=NS_COEFFS, ns_steps=len(NS_COEFFS), beta=o.muon_momentum,
                             nesterov=True, weight_decay=o.weight_decay, consistent_rms=o.muon_rms,
                             adam_b1=o.b1, adam_b2=o.b2, adam_weight_decay=o.weight_decay,
                             muon_weight_dimension_numbers=muon_partition(params))
    want = run(ref, pure, grads)
    dims = muon_partition(params)
    checked = 0
    for d, a, b in zip(jax.tree.leaves(dims, is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers)),
                       jax.tree.leaves(got), jax.tree.leaves(want)):
        if d is not None:  # the Muon leaves (AdamW's masks differ between the two wrappers)
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
            checked += 1
    assert checked > 20


# (mesh axes, mesh.fsdp_min_size): the last keeps tiny's matrices below 4096 elements a layer
# whole over fsdp (its stacked groups split among the replicas), the others split them
MESHES = [(dict(fsdp=8), 0), (dict(fsdp=2, expert=2, tensor=2), 0), (dict(data=2, fsdp=4), 0),
          (dict(expert=4, tensor=2), 0), (dict(fsdp=8), 4096)]


@pytest.mark.slow
@pytest.mark.parametrize("axes, min_size", MESHES,
                         ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()) if isinstance(a, dict) else f"min{a}")
def test_sharded_equals_unsharded(tiny, axes, min_size):
    cfg, params, pure, grads, want = tiny
    mesh = make_mesh(MeshConfig.from_dict({"data": 1, **axes}), cfg.model)
    rules = Rules(fsdp_min_size=min_size)
    shard = nest({path: NamedSharding(mesh, rules.var_spec(var)) for path, var in nnx.to_flat_state(params)})
    if min_size:  # both placements occur
        assert {"fsdp" in str(s.spec) for s in jax.tree.leaves(shard)} == {True, False}
    placed = jax.device_put(pure, shard)
    tx = make_optimizer(cfg.optim, cfg.train.steps, params, mesh=mesh, rules=rules)
    got = run(tx, placed, [jax.device_put(g, shard) for g in grads], shard)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(got), jax.tree.leaves(shard)))


@pytest.mark.parametrize("shape, spec, whole, share", [((8,), P(), 16, 8), ((2, 4), P(None, None, "fsdp"), 4, 2)],
                         ids=["replicated", "fsdp4-data2"])
def test_replicas_share_the_newton_schulz(shape, spec, whole, share):
    """16 stacked 64 x 96 matrices on 8 devices: replicated on all 8 (one `data` axis), or their
    columns over fsdp=4 and replicated over data=2. Each device holds `whole` matrices after the
    fsdp exchange and the `share` replicas split their columns and the rows of A A: per step
    and matrix a device does (4 m^2 n + 2 m^3) / share FLOPs (counted in the compiled program by
    plan.hlo_flops; without the sharing every replica did all of it), and the result equals
    the unsharded computation. Below train.muon.SHARE_MIN elements (the default) the replicas
    split the stack instead: each orthogonalises whole / share of the matrices (the same FLOPs,
    one all_gather instead of one per iteration); a lone matrix there is done by every replica."""
    from jax.sharding import NamedSharding

    from plan.flops import hlo_flops
    from train.muon import orthogonalize

    mesh = jax.make_mesh(shape, ("data", "fsdp")[:len(shape)])
    dims = MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    coeffs = jax.numpy.asarray(NS_COEFFS, jax.numpy.float32)
    x = np.random.default_rng(0).standard_normal((16, 64, 96)).astype(np.float32)
    fn = jax.jit(lambda a: orthogonalize(a, dims, coeffs, 1e-8, spec, mesh, share_min=0))
    placed = jax.device_put(x, NamedSharding(mesh, spec))
    flops, unknown = hlo_flops(fn.lower(placed).compile().as_text())
    m, n = 64, 96
    assert unknown == 0 and flops == whole * len(NS_COEFFS) * (4 * m * m * n + 2 * m ** 3) / share
    split = jax.jit(lambda a: orthogonalize(a, dims, coeffs, 1e-8, spec, mesh))  # 64 x 96 < SHARE_MIN
    flops, _ = hlo_flops(split.lower(placed).compile().as_text())
    assert flops == whole * len(NS_COEFFS) * (4 * m * m * n + 2 * m ** 3) / share
    want = jax.jit(lambda a: orthogonalize(a, dims, coeffs, 1e-8))(x)
    np.testing.assert_allclose(fn(placed), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split(placed), want, rtol=1e-5, atol=1e-6)
    one = jax.device_put(x[0], NamedSharding(mesh, P(*spec[1:])))
    lone = jax.jit(lambda a: orthogonalize(a, MuonDimensionNumbers(0, 1), coeffs, 1e-8, P(*spec[1:]), mesh))
    flops, _ = hlo_flops(lone.lower(one).compile().as_text())
    assert flops == len(NS_COEFFS) * (4 * m * m * n + 2 * m ** 3)
    np.testing.assert_allclose(lone(one), want[0], rtol=1e-5, atol=1e-6)


def test_newton_schulz_in_bfloat16(tiny):
    """optim.muon_dtype=bfloat16: the Newton-Schulz runs in bfloat16 (Muon's usual precision)
    and the parameters stay float32; each Muon leaf's three-step change is the float32 run's to
    bfloat16 accuracy (a few % in norm), and not the same numbers (the cast really happened)."""
    import dataclasses

    cfg, params, pure, grads, want = tiny
    o = dataclasses.replace(cfg.optim, muon_dtype="bfloat16")
    got = run(make_optimizer(o, cfg.train.steps, params), pure, grads)
    dims = jax.tree.leaves(muon_partition(params), is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))
    checked = 0
    for d, p0, a, b in zip(dims, jax.tree.leaves(pure), jax.tree.leaves(got), jax.tree.leaves(want)):
        if d is None:
            continue
        assert a.dtype == np.float32
        da, db = np.asarray(a, np.float64) - p0, np.asarray(b, np.float64) - p0
        assert np.linalg.norm(da - db) < 0.03 * np.linalg.norm(db)
        checked += int(np.any(da != db))
    assert checked > 20
