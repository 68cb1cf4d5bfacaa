"""Sharded execution equals single-device execution; shardings follow the rules; bad meshes fail."""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import ConfigError, build, param_counts, preset
from model.attention import chosen
from model.layers import sorted_top_k
from model.moe import MoE
from parallel import (MeshConfig, Rules, abstract_mesh, create_sharded, describe, make_mesh,
                      per_device_shapes, sharded)
from parallel.rules import shardings
from parallel.expert import ExpertParallel, capacity, ragged_capacity

from sizes import SMALL

MESHES = [
    dict(data=8),
    dict(data=1, fsdp=8),
    dict(data=1, expert=8),
    dict(data=2, expert=2, tensor=2),
    dict(data=1, fsdp=2, expert=4),
    dict(data=1, tensor=2, fsdp=4),
]
BATCH = 8


def loss_fn(m, ids):
    logits, aux = m(ids)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, ids[..., None], -1)), logits


def grad_step(m, ids):
    return nnx.value_and_grad(loss_fn, has_aux=True)(m, ids)


@pytest.fixture(scope="module")
def reference():
    cfg = preset("tiny", **SMALL)
    ids = jax.random.randint(jax.random.key(0), (BATCH, 32), 0, cfg.vocab_size, jnp.int32)
    m = build(cfg, rngs=nnx.Rngs(0))
    (_, logits), grads = nnx.jit(grad_step)(m, ids)
    return cfg, ids, logits, grads


def grad_errors(got, ref):
    """(norm-wise relative error of the whole gradient, per-leaf max |diff| / max |ref|). The
    per-leaf denominator is floored at 1% of the largest gradient anywhere: a few mHC biases have
    gradients ~1e-6 of the rest (sums over tokens that nearly cancel), where float32 summation
    order alone moves the last digits."""
    g, r = dict(nnx.to_flat_state(got)), dict(nnx.to_flat_state(ref))
    pairs = {k: (np.asarray(g[k].get_value(), np.float64), np.asarray(v.get_value(), np.float64))
             for k, v in r.items()}
    scale = max(np.abs(b).max() for _, b in pairs.values())
    diff = math.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs.values()))
    norm = math.sqrt(sum(np.sum(b ** 2) for _, b in pairs.values()))
    leaf = {k: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-2 * scale)) for k, (a, b) in pairs.items()}
    return diff / norm, leaf


def place(m, mesh, rules):
    """The model's values on `mesh` where the rules say (device_put: no initialiser to compile)."""
    graphdef, state = nnx.split(m)
    return nnx.merge(graphdef, jax.device_put(state, shardings(mesh, rules.param_specs(m))))


@pytest.mark.slow
@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
def test_sharded_forward_and_gradients_equal_single_device(reference, axes):
    cfg, ids, ref_logits, ref_grads = reference
    rules = Rules()
    mesh = make_mesh(MeshConfig(**axes), cfg, global_batch=BATCH)
    m = place(build(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    x = jax.device_put(ids, NamedSharding(mesh, rules.spec(("batch", None))))
    with sharded(mesh, rules):
        step = nnx.jit(grad_step)
        if axes == dict(data=8):  # parameters whole, batch split: nothing to gather (a top-k or
            # scatter the partitioner cannot split gathers the whole batch onto every device)
            assert " all-gather(" not in step.lower(m, x).compile().as_text()
        (_, logits), grads = step(m, x)
    assert float(jnp.abs(logits - ref_logits).max() / jnp.abs(ref_logits).max()) < 1e-5
    total, errs = grad_errors(grads, ref_grads)
    worst = max(errs, key=errs.get)
    assert total < 1e-5 and errs[worst] < 1e-5, (describe(mesh), total, worst, errs[worst])


def test_sorted_top_k_is_lax_top_k():
    """sorted_top_k (installed on CPU meshes) returns jax.lax.top_k's values and indices bit for
    bit, on scores full of ties, +0 / -0 (sums of ReLUs), -inf (invisible blocks) and NaN."""
    rng = np.random.default_rng(0)
    for shape in [(4, 16, 40), (300, 8)]:
        x = rng.integers(0, 3, shape).astype(np.float32)
        x = np.where(rng.random(shape) < 0.3, -0.0, x)
        x = np.where(rng.random(shape) < 0.1, -np.inf, x)
        x = np.where(rng.random(shape) < 0.05, np.nan, x)
        for k in (1, 3, shape[-1] // 2, shape[-1]):
            want, got = jax.lax.top_k(x, k), sorted_top_k(jnp.asarray(x), k)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32))


def test_chosen_marks_the_picks():
    """attention.chosen: True exactly at each query's picked blocks (-1: no pick), by hand."""
    idx = np.random.default_rng(1).integers(-1, 12, (2, 5, 4))
    want = np.zeros((2, 5, 12), bool)
    for b, s, j in np.ndindex(idx.shape):
        if idx[b, s, j] >= 0:
            want[b, s, idx[b, s, j]] = True
    np.testing.assert_array_equal(chosen(jnp.asarray(idx), 12), want)


def test_rules_keep_small_parameters_whole_over_fsdp():
    """mesh.fsdp_min_size: a parameter whose one layer (its shape without the `layers`
    dimension) has fewer elements loses only the fsdp axis of its PartitionSpec."""
    rules = Rules({"embed": ["fsdp", "expert"]}, fsdp_min_size=4096)
    assert rules.param_spec(("layers", "embed", "heads"), (3, 64, 32)) == P(None, "expert", "tensor")  # 2048
    assert rules.param_spec(("layers", "embed", "heads"), (3, 64, 64)) == P(None, ("fsdp", "expert"), "tensor")
    assert Rules(fsdp_min_size=4096).param_spec(("embed",), (64,)) == P(None)
    assert Rules().param_spec(("embed",), (64,)) == P("fsdp")
    with pytest.raises(ConfigError, match="mesh.fsdp_min_size: must be >= 0"):
        MeshConfig(fsdp_min_size=-1)


@pytest.mark.slow
def test_small_parameters_whole_over_fsdp_equal_single_device(reference):
    """fsdp=8 with the parameters below 4096 elements a layer whole over fsdp (the rest split,
    the expert layer's shard_map reading each weight where it lies): the forward and gradients
    equal one device's, and the step has fewer all-gathers than with every parameter split."""
    cfg, ids, ref_logits, ref_grads = reference
    mesh = make_mesh(MeshConfig(data=1, fsdp=8), cfg, global_batch=BATCH)
    gathers = {}
    for rules in (Rules(), Rules(fsdp_min_size=4096)):
        m = place(build(cfg, rngs=nnx.Rngs(0)), mesh, rules)
        x = jax.device_put(ids, NamedSharding(mesh, rules.spec(("batch", None))))
        with sharded(mesh, rules):
            step = nnx.jit(grad_step)
            gathers[rules.fsdp_min_size] = step.lower(m, x).compile().as_text().count(" all-gather(")
            if rules.fsdp_min_size:
                (_, logits), grads = step(m, x)
    placed = {"fsdp" in str(a.sharding.spec) for a in jax.tree.leaves(nnx.state(m, nnx.Param))}
    assert placed == {True, False}
    assert gathers[4096] < gathers[0], gathers
    assert float(jnp.abs(logits - ref_logits).max() / jnp.abs(ref_logits).max()) < 1e-5
    total, errs = grad_errors(grads, ref_grads)
    worst = max(errs, key=errs.get)
    assert total < 1e-5 and errs[worst] < 1e-5, (total, worst, errs[worst])


@pytest.mark.parametrize("axes", [MESHES[3], MESHES[4]], ids=["d2e2t2", "f2e4"])
def test_create_sharded_initialises_in_place_the_single_device_values(reference, axes):
    """The jitted initialiser writes each parameter straight into the shards the rules name,
    with the values one device draws (threefry is partitionable; eager and jitted arithmetic
    may differ in the last bit)."""
    cfg = reference[0]
    mesh = make_mesh(MeshConfig(**axes), cfg, global_batch=BATCH)
    m = create_sharded(cfg, mesh, Rules(), seed=0)
    assert m.embed.get_value().sharding.spec == P("tensor", "fsdp")
    assert m.head.w.get_value().sharding.spec == P("fsdp", "tensor")
    assert m.embed.get_value().sharding.mesh == mesh
    stacked = m.segments[1].blocks[0]  # the 2 scanned CSA layers: `layers` unsharded
    assert stacked.ffn.w1.get_value().sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert stacked.attn.wq_b.w.get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    assert stacked.attn.wo_b.w.get_value().sharding.spec == P(None, "tensor", None, "fsdp")
    assert stacked.attn.wkv.w.get_value().sharding.spec == P(None, "fsdp", None)  # K=V head replicated on tensor
    want = dict(nnx.to_flat_state(nnx.state(build(cfg, rngs=nnx.Rngs(0)))))
    got = dict(nnx.to_flat_state(nnx.state(m)))
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(got[k].get_value()), np.asarray(v.get_value()), rtol=3e-7,
                                   atol=0, err_msg=str(k))


@pytest.fixture(scope="module")
def moe_case():
    cfg = preset("tiny")
    moe = MoE(cfg, hashed=False, rngs=nnx.Rngs(4))
    moe.bias.set_value(jnp.linspace(-1.0, 1.0, cfg.n_routed_experts))  # skew the load
    x = jax.random.normal(jax.random.key(2), (BATCH, 16, cfg.dim))
    ids = jnp.zeros((BATCH, 16), jnp.int32)
    return cfg, moe, x, ids


def run_ep(moe, x, ids, mesh, rules, capacity_factor):
    state_specs = rules.param_specs(moe)
    graphdef, state = nnx.split(moe)
    state = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs,
                                               is_leaf=lambda s: isinstance(s, P)))
    xs = jax.device_put(x, NamedSharding(mesh, rules.spec(("batch", None, None))))
    with sharded(mesh, rules, "capacity", capacity_factor):
        return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, ids))(state, xs)


def test_capacity_transport_dropless_is_exact(moe_case):
    cfg, moe, x, ids = moe_case
    ref, _ = moe(x, ids)
    for axes in (dict(data=1, expert=8), dict(data=2, expert=2, tensor=2)):
        mesh = make_mesh(MeshConfig(**axes), cfg, global_batch=BATCH)
        got, stats = run_ep(moe, x, ids, mesh, Rules(), None)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        assert int(stats["dropped"]) == 0


def test_expert_parallel_quantises_as_one_device():
    """fp4 routed experts + fp8 shared expert: the expert-parallel path rounds the same operands."""
    cfg = preset("tiny", quant_experts="fp4", quant_matmul="fp8", quant_block=16)
    moe = MoE(cfg, hashed=False, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(2), (BATCH, 16, cfg.dim))
    ids = jnp.zeros((BATCH, 16), jnp.int32)
    ref, _ = moe(x, ids)
    unquantised, _ = MoE(preset("tiny"), hashed=False, rngs=nnx.Rngs(4))(x, ids)
    assert float(jnp.abs(ref - unquantised).max()) > 1e-4  # the rounding is visible
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2), cfg, global_batch=BATCH)
    got, _ = run_ep(moe, x, ids, mesh, Rules(), None)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations (loops, custom
    derivatives, shard_map, jit)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)


def _bfloat16_moe(x_dtype):
    """A tiny MoE computing in bfloat16, an input stream in `x_dtype`, and its jitted forward
    (state, x) -> output: (cfg, moe, x, ids, state, forward)."""
    cfg = preset("tiny", dtype="bfloat16")
    moe = MoE(cfg, hashed=False, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(2), (BATCH, 16, cfg.dim), x_dtype)
    ids = jnp.zeros((BATCH, 16), jnp.int32)
    graphdef, state = nnx.split(moe)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, ids)[0])
    return cfg, moe, x, ids, state, forward


def test_bfloat16_expert_products_stay_bfloat16():
    """In bfloat16 every product of bfloat16 operands in the MoE forward is bfloat16 (accumulated
    in float32 inside), on one device and expert-parallel: DeepSeek's reference rounds w1(x),
    w3(x) and w2(h) to the activations' dtype, and a float32 product would keep [rows, D] float32
    buffers (and their cotangents) for every routed row. The router stays float32."""
    cfg, moe, x, ids, state, forward = _bfloat16_moe(jnp.bfloat16)
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2), cfg, global_batch=BATCH)
    with sharded(mesh, Rules(), "capacity", None):
        parallel = jax.make_jaxpr(forward)(state, x)
    for name, jaxpr in (("one device", jax.make_jaxpr(forward)(state, x)), ("expert-parallel", parallel)):
        dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name in ("dot_general", "ragged_dot")]
        low = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
        assert len(low) >= 3 and len(dots) > len(low), name  # experts' products; the float32 router
        assert all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in low), (name, low)
    got, _ = run_ep(moe, x, ids, mesh, Rules(), None)
    ref = forward(state, x)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


def test_capacity_transport_counts_and_drops_overflow(moe_case):
    cfg, moe, x, ids = moe_case
    mesh = make_mesh(MeshConfig(data=2, expert=4), cfg, global_batch=BATCH)
    factor = 0.5
    got, stats = run_ep(moe, x, ids, mesh, Rules(), factor)
    # the same bookkeeping by hand: each of the 8 token shards sends its (token, slot) pairs in
    # order; the first C to each destination fit, the rest are dropped
    idx, wts, _ = moe.route(x.reshape(-1, cfg.dim), None)
    idx = np.asarray(idx).reshape(8, -1)               # [source shard, pairs]
    ep, e_local = 4, cfg.n_routed_experts // 4
    c = capacity(idx.shape[1], ep, factor)
    keep = np.zeros_like(idx, bool)
    for src in range(8):
        seen = np.zeros(ep, int)
        for p, e in enumerate(idx[src]):
            keep[src, p] = seen[e // e_local] < c
            seen[e // e_local] += 1
    assert int(stats["dropped"]) == int((~keep).sum()) > 0
    kept_w = jnp.asarray(np.asarray(wts).reshape(8, -1) * keep).reshape(-1, cfg.n_activated_experts)
    want = moe._dense(x.reshape(-1, cfg.dim), jnp.asarray(idx).reshape(-1, cfg.n_activated_experts), kept_w)
    want = want + moe.shared(x.reshape(-1, cfg.dim))
    np.testing.assert_allclose(got.reshape(-1, cfg.dim), want, rtol=1e-5, atol=1e-6)


def test_fsdp_divides_parameter_memory(reference):
    cfg, ids, _, _ = reference
    total = 4 * param_counts(cfg)["total"]
    rules = Rules()
    model = build(cfg, rngs=nnx.Rngs(0))

    def argument_bytes(axes):
        mesh = make_mesh(MeshConfig(**axes), cfg, global_batch=BATCH)
        m = place(model, mesh, rules)
        x = jax.device_put(ids, NamedSharding(mesh, rules.spec(("batch", None))))
        with sharded(mesh, rules):
            # the arguments (parameters + batch) are those of the train step; the forward compiles faster
            mem = nnx.jit(loss_fn).lower(m, x).compile().memory_analysis()
        not_params = nnx.state(m, nnx.Not(nnx.Param))
        rest_bytes = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(not_params))
        return mem.argument_size_in_bytes - rest_bytes - ids.nbytes // 8

    full, f2, f8 = argument_bytes(dict(data=8)), argument_bytes(dict(data=4, fsdp=2)), argument_bytes(dict(data=1, fsdp=8))
    assert abs(full / total - 1) < 0.01
    assert full > f2 > f8
    assert abs(f8 / (total / 8) - 1) < 0.15, f8 / (total / 8)


@pytest.mark.parametrize("mesh_cfg, changes, batch, message", [
    (MeshConfig(data=4, expert=4), {}, None, "mesh: data*fsdp*expert*tensor = 16 per slice but there are 8 devices"),
    (MeshConfig(data=-1, fsdp=-1), {}, None, "mesh: only one axis may be -1"),
    (MeshConfig(data=-1, expert=3), {}, None, "mesh.data: -1 cannot fill 8 devices"),
    (MeshConfig(data=1, tensor=8), {}, None, "mesh.tensor: n_heads=4 is not divisible by tensor=8"),
    (MeshConfig(data=2, expert=4), dict(n_routed_experts=6, n_activated_experts=2), None,
     "mesh.expert: n_routed_experts=6 is not divisible by expert=4"),
    (MeshConfig(data=1, fsdp=8), dict(dim=36), None, "mesh.fsdp: dim=36 is not divisible by fsdp=8"),
    (MeshConfig(data=2, expert=2, tensor=2), {}, 6, "batch: global batch 6 is not divisible by data*fsdp*expert = 4"),
])
def test_bad_meshes_name_the_field(mesh_cfg, changes, batch, message):
    with pytest.raises(ConfigError) as e:
        make_mesh(mesh_cfg, preset("tiny", **changes), global_batch=batch)
    assert str(e.value).startswith(message)


def test_bad_rules_name_the_problem():
    with pytest.raises(ConfigError, match=r"rules.embedd: not a logical axis name; did you mean 'rules.embed'\?"):
        Rules({"embedd": "fsdp"})
    with pytest.raises(ConfigError, match=r"rules.embed: 'fsd' is not a mesh axis"):
        Rules({"embed": "fsd"})
    with pytest.raises(ConfigError, match=r"mesh axis 'tensor' would shard both 'experts' and 'expert_mlp'"):
        Rules({"experts": "tensor"}).spec(("experts", "embed", "expert_mlp"))
    with pytest.raises(ConfigError, match=r"mesh.tensr: not a mesh field; did you mean 'mesh.tensor'\?"):
        MeshConfig.from_dict({"tensr": 2})
    with pytest.raises(ConfigError, match="rules.experts: expert axes"):
        ExpertParallel(make_mesh(MeshConfig(data=2, expert=4)), Rules({"batch": ["data"]}))


def test_rules_override_moves_a_dimension():
    rules = Rules({"vocab": None, "embed": ["fsdp", "expert"]})
    assert rules.spec(("vocab", "embed")) == P(None, ("fsdp", "expert"))


def test_v4_pro_on_512_devices_planned_without_devices():
    t0 = time.perf_counter()
    sizes = MeshConfig(data=8, fsdp=4, expert=16).resolve(512)
    shapes = per_device_shapes(preset("v4-pro"), abstract_mesh(sizes), Rules())
    assert time.perf_counter() - t0 < 30
    cfg = preset("v4-pro")
    w1 = [v for k, v in shapes.items() if k.endswith("ffn/w1")]
    # 4 main-layer segments' blocks + 1 MTP block: [.., 384, 7168, 3072] -> 24 experts, 1792 of embed
    assert len(w1) == 5 and all(local[-3:] == (24, 1792, 3072) for _, local, _ in w1)
    emb = shapes["embed"]
    assert emb[0] == (cfg.vocab_size, cfg.dim) and emb[1] == (cfg.vocab_size, cfg.dim // 4)
    total = sum(b for _, _, b in shapes.values())
    # experts are split 64 ways (expert x fsdp), everything else 4 ways (fsdp): the bytes land between
    params = 4 * param_counts(cfg)["total"]
    assert params / 64 < total < params / 4
    assert math.isclose(sum(math.prod(g) for g, _, _ in shapes.values()),
                        param_counts(cfg)["total"] + sum(math.prod(g) for k, (g, _, _) in shapes.items()
                                                         if k.endswith(("bias", "tid2eid"))))


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                               *, axis_name):
    """jax.lax.ragged_all_to_all's documented semantics from all_gathers (XLA:CPU lacks the op):
    sender j's rows input_offsets[j][me] + [0, send_sizes[j][me]) land in my output at
    output_offsets[j][me] + [0, send_sizes[j][me])."""
    ops = jax.lax.all_gather(operand, axis_name)
    ins, sends, outs = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
    me = jax.lax.axis_index(axis_name)
    rows = jnp.arange(output.shape[0])
    for j in range(ops.shape[0]):
        start, size, src = outs[j, me], sends[j, me], ins[j, me]
        hit = (rows >= start) & (rows < start + size)
        take = ops[j][jnp.clip(src + rows - start, 0, operand.shape[0] - 1)]
        output = jnp.where(hit.reshape((-1,) + (1,) * (output.ndim - 1)), take, output)
    return output


def test_ragged_transport_offsets_with_emulated_collective(moe_case, monkeypatch):
    """The ragged transport's size / offset bookkeeping, run on CPU through an emulation of the
    collective; on TPU / GPU the real `ragged_all_to_all` runs the same code."""
    cfg, moe, x, ids = moe_case
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    ref, _ = moe(x, ids)
    ref_grad = nnx.grad(lambda m: jnp.sum(m(x, ids)[0] ** 2))(moe)
    rules = Rules()
    for axes in (dict(data=1, expert=8), dict(data=2, expert=2, tensor=2)):
        mesh = make_mesh(MeshConfig(**axes), cfg, global_batch=BATCH)
        xs = jax.device_put(x, NamedSharding(mesh, rules.spec(("batch", None, None))))
        with sharded(mesh, rules, "ragged"):
            got, dropped = nnx.jit(lambda m, x: (lambda y, st: (y, st["dropped"]))(*m(x, ids)))(moe, xs)
            grad = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x, ids)[0] ** 2)))(moe, xs)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
        assert int(dropped) == 0


def test_transport_choice():
    from parallel import choose_transport

    assert choose_transport("auto", "cpu") == "capacity"
    assert choose_transport("auto", "tpu") == "ragged" and choose_transport("auto", "gpu") == "ragged"
    assert choose_transport("capacity", "tpu") == "capacity"
    with pytest.raises(ConfigError, match="moe_transport"):
        choose_transport("nccl")


def test_ragged_transport_capacity_cuts_and_counts(moe_case, monkeypatch):
    """A ragged receive buffer of capacity_factor x the balanced load: each receiver takes the
    senders' chunks in sender order until full; what does not fit is dropped and counted."""
    cfg, moe, x, ids = moe_case
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    mesh = make_mesh(MeshConfig(data=1, expert=8), cfg, global_batch=BATCH)
    rules, factor = Rules(), 0.75
    xs = jax.device_put(x, NamedSharding(mesh, rules.spec(("batch", None, None))))
    with sharded(mesh, rules, "ragged", factor):
        got, stats = nnx.jit(lambda m, x: m(x, ids))(moe, xs)
    idx, wts, _ = moe.route(x.reshape(-1, cfg.dim), None)
    idx = np.asarray(idx).reshape(8, -1)               # [sender, pairs in token-major order]
    ep, e_local = 8, cfg.n_routed_experts // 8
    cap = ragged_capacity(idx.shape[1], ep, factor)
    keep, used = np.zeros_like(idx, bool), np.zeros(ep, int)
    for src in range(8):                              # receivers fill in sender order
        for dest in range(ep):
            mine = np.flatnonzero(idx[src] // e_local == dest)
            fit = max(0, min(len(mine), cap - used[dest]))
            keep[src, mine[:fit]] = True
            used[dest] += len(mine)
    assert int(stats["dropped"]) == int((~keep).sum()) > 0
    kept_w = jnp.asarray(np.asarray(wts).reshape(8, -1) * keep).reshape(-1, cfg.n_activated_experts)
    want = moe._dense(x.reshape(-1, cfg.dim), jnp.asarray(idx).reshape(-1, cfg.n_activated_experts), kept_w)
    want = want + moe.shared(x.reshape(-1, cfg.dim))
    np.testing.assert_allclose(got.reshape(-1, cfg.dim), want, rtol=1e-5, atol=1e-6)


def test_hooks_are_scoped_to_the_context_and_the_thread():
    """`sharded` installs the constrain and experts hooks for its `with` block only, in the
    thread that entered it; a trace elsewhere sees the single-device model."""
    import threading

    from model.layers import hooks

    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2), preset("tiny"), global_batch=BATCH)
    seen = {}
    with sharded(mesh, Rules()):
        inside = hooks()
        t = threading.Thread(target=lambda: seen.setdefault("other", hooks()))
        t.start()
        t.join()
        with sharded(mesh, Rules(), transport="capacity", capacity_factor=2.0):
            nested = hooks().experts
        assert hooks() == inside  # the nested block restored the outer hooks
    assert isinstance(inside.experts, ExpertParallel) and inside.constrain is not None
    assert nested is not inside.experts
    assert seen["other"].experts is None and seen["other"].constrain is None
    assert hooks().experts is None and hooks().constrain is None


def test_expert_rows_travel_in_the_compute_dtype():
    """A float32 residual stream into bfloat16 experts: the rows sent to the experts' devices and
    the results sent back are bfloat16 (the experts read them in bfloat16 anyway: half the bytes
    on the wire and in the receive buffers), and the output equals the one-device layer's."""
    cfg, moe, x, ids, state, forward = _bfloat16_moe(jnp.float32)
    mesh = make_mesh(MeshConfig(data=2, expert=4), cfg, global_batch=BATCH)
    with sharded(mesh, Rules(), "capacity", None):
        jaxpr = jax.make_jaxpr(forward)(state, x)
    sent = [e.invars[0].aval for e in _equations(jaxpr.jaxpr) if e.primitive.name == "all_to_all"]
    rows = [a for a in sent if a.ndim == 2 and a.shape[1] == cfg.dim]
    assert len(rows) == 2 and all(a.dtype == jnp.bfloat16 for a in rows), sent  # tokens out, results back
    got, _ = run_ep(moe, x, ids, mesh, Rules(), None)
    np.testing.assert_allclose(got, forward(state, x), rtol=1e-6, atol=1e-6)
