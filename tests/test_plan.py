"""`python -m plan`: the chip catalogue, topologies, exact per-device state bytes, activation
residuals, mesh suggestion, and (with libtpu) an ahead-of-time compile for a real TPU slice."""
import math

import jax
import pytest

import plan as P
from model.counts import param_counts
from parallel import Rules, make_mesh
from parallel.mesh import MeshConfig, abstract_mesh
from parallel.rules import per_device_shapes
from train.config import load_run_config

from sizes import SMALL_OVERRIDES

TINY = "configs/tiny.yaml"
POD = "configs/v4-flash-pod.yaml"
# the tiny model with widths that fill the TPU's 128-lane tiles, so that compiled argument
# bytes measure the sharding rather than tile padding (a 32-wide matrix is stored 128 wide);
# no MTP layer: libtpu compiles the step in ~20 s instead of ~27 s
ALIGNED = ["model.n_layers=2", "model.compress_ratios=[0,4]", "model.n_mtp_layers=0", "model.dtype=float32", "model.dim=128",
           "model.head_dim=128", "model.rope_head_dim=64", "model.q_lora_rank=128", "model.o_lora_rank=128",
           "model.index_head_dim=128", "model.moe_inter_dim=128", "data.seq_len=32", "data.global_batch=8"]


def test_chip_catalogue(tmp_path):
    """plan/chips.yaml, loaded: the figures the catalogue had as code (copied here by hand), HBM
    in bytes and the peak in FLOP/s per JAX device; a malformed entry is refused by name."""
    GiB, MiB = 2 ** 30, 2 ** 20
    want = {"v4": ("TPU v4", 32 * GiB, 275e12, 1, 2, 3, 4), "v5e": ("TPU v5e", 16 * GiB, 197e12, 1, 1, 2, 4),
            "v5p": ("TPU v5p", 95 * GiB, 459e12, 1, 2, 3, 4),
            "v6e": ("TPU v6e (Trillium)", 32 * GiB, 918e12, 1, 1, 2, 4),
            "tpu7x": ("TPU7x (Ironwood)", 96 * GiB, 1153.5e12, 2, 2, 3, 4),
            "h100": ("NVIDIA H100 SXM", 81559 * MiB, 989e12, 1, 1, 0, 8),
            "h200": ("NVIDIA H200", 143771 * MiB, 989e12, 1, 1, 0, 8)}
    assert P.load_chips() == P.CHIPS == {k: P.Chip(*v) for k, v in want.items()}
    assert list(P.CHIPS) == list(want)  # the order error messages list them in
    bad = tmp_path / "chips.yaml"
    bad.write_text("x1:\n  kind: X\n  hbm_gib: 1\n  hbm_mib: 1024\n  peak_tflops: 1\n"
                   "  devices_per_chip: 1\n  units_per_chip: 1\n  chips_per_host: 4\n")
    with pytest.raises(P.PlanError, match=r"'x1': missing \['torus'\]; give exactly one of hbm_gib / hbm_mib"):
        P.load_chips(bad)


def test_topology_names():
    t = P.parse_topology("v5p-1024")  # v5p-N counts TensorCores: 2 per chip, one JAX device per chip
    assert (t.chips, t.shape, t.devices, t.tpu_name, t.devices_per_host) == (512, (8, 8, 8), 512, "v5p:8x8x8", 4)
    t = P.parse_topology("tpu7x-128")  # TPU7x: 2 TensorCores per chip, each its own JAX device
    assert (t.chips, t.shape, t.devices, t.devices_per_host) == (64, (4, 4, 4), 128, 8)
    assert P.parse_topology("v5p-4").devices_per_host == 2  # one host with 2 chips
    assert P.parse_topology("v6e-256").shape == (16, 16)
    assert P.parse_topology("v5p-8").shape == (2, 2, 1)
    assert P.parse_topology("v5p-256").tpu_name == "v5p:4x4x8"
    assert P.parse_topology("v5p:4x4x12").devices == 192
    g = P.parse_topology("gpu:h200x64")
    assert (g.devices, g.shape, g.tpu_name, g.devices_per_host) == (64, (), None, 8)
    for bad, words in (("v5p-6", "not a power of two"), ("v5p-7", "2 per chip"), ("v9-8", "TPU families"),
                       ("gpu:a100x8", "unknown GPU"), ("v6e:4x4x4", "2 dimensions")):
        with pytest.raises(P.PlanError, match=words):
            P.parse_topology(bad)


@pytest.mark.tpu_aot
@pytest.mark.skipif(not P.libtpu_available(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_topology_matches_libtpu(monkeypatch):
    from jax.experimental import topologies

    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    for name in ("v5p-1024", "tpu7x-128", "v6e-256", "v5p-8"):
        t = P.parse_topology(name)
        assert len(topologies.get_topology_desc(t.tpu_name, "tpu").devices) == t.devices, name
    # the pod config's expert=16 on an 8x8x8 torus needs a physical axis split in two
    devices = topologies.get_topology_desc("v5p:8x8x8", "tpu").devices
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, expert=16), devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "expert": 16, "tensor": 1}


@pytest.fixture(scope="module")
def pod():
    cfg = load_run_config(POD, [])
    layout = P.StateLayout(cfg, Rules(cfg.rules))
    return cfg, layout


def test_pod_param_bytes_exact(pod):
    """The plan's per-device parameter bytes on v4-flash's pod mesh = the per-device shapes of
    the sharding rules (parallel/rules.py, ceil-divided per axis), summed by hand; and the
    global bytes = the closed-form parameter count x 4 (float32)."""
    cfg, layout = pod
    assert layout.param_bytes == param_counts(cfg.model)["total"] * 4
    sizes = {"data": 1, "fsdp": 32, "expert": 16, "tensor": 1}
    got = layout.bytes_per_device(abstract_mesh(sizes))
    shapes = per_device_shapes(cfg.model, abstract_mesh(sizes), Rules())
    assert got["params"] + got["rest"] == sum(b for _, _, b in shapes.values())
    # experts are split 16 ways and everything else 32 ways (fsdp): well under the global / 16
    assert layout.param_bytes / 512 < got["params"] < layout.param_bytes / 16


def test_import_host_memory(pod):
    """What one process holds while importing a released checkpoint onto v4-flash's pod mesh:
    the largest per-device shard of one parameter (the rules' per-device shapes, by hand) and
    the largest checkpoint tensor in float32: the vocab x dim embedding, since a stacked
    parameter is stored one tensor per layer and expert (one expert matrix is dim x 2048)."""
    from flax import nnx

    cfg, layout = pod
    mesh = abstract_mesh({"data": 1, "fsdp": 32, "expert": 16, "tensor": 1})
    shard, source = P.import_host_bytes(layout.param_state, Rules(), mesh, 4)
    params = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(layout.param_state)}
    shapes = per_device_shapes(cfg.model, mesh, Rules())
    assert shard == max(b for path, (_, _, b) in shapes.items() if path in params)
    assert source == cfg.model.vocab_size * cfg.model.dim * 4


def test_vocab_partials(pod):
    """The embedding's and the head's gradients before their reduce-scatter, by hand: on
    fsdp=32 x expert=16 (batch axes only) each device holds a full vocab x dim float32 partial
    of both, twice (partial + collective buffer); tensor=2 splits the vocabulary; the loss's
    head made 8 vocabulary slices at a time holds an eighth of the head's."""
    cfg, layout = pod
    full = cfg.model.vocab_size * cfg.model.dim * 4
    assert layout.vocab_partials(abstract_mesh({"data": 1, "fsdp": 32, "expert": 16, "tensor": 1})) == 4 * full
    assert layout.vocab_partials(abstract_mesh({"data": 1, "fsdp": 16, "expert": 16, "tensor": 2})) == 2 * full
    assert layout.vocab_partials(abstract_mesh({"data": 1, "fsdp": 32, "expert": 16, "tensor": 1}), 8) == 2 * full + full // 4


def test_exchange_bytes(pod):
    """The expert-parallel MoE layer's backward, by hand: v4-flash-pod holds 4096 tokens per
    device, 6 pairs each, into a receive buffer of 2 x the pairs (capacity factor 2), with 16
    local experts of 4096 x 2048. What the backward keeps of the local experts (jax.vjp,
    traced): the sorted rows [R, 4096] and the gate, up and gated hidden products [R, 2048] in
    bfloat16 (SwiGLU keeps its inputs, not their float32 upcasts), the three weight stacks cast
    to bfloat16, the permutation, its inverse and the gates [R, 1], the group sizes; nothing
    [R, 4096] in float32 or as a mask. With them in the backward: the received rows' cotangent
    [R, 4096] in bfloat16 and SwiGLU's two float32 upcasts [R, 2048]. Dropless receives every
    sender's pairs; no expert axis, none of it."""
    import dataclasses

    from plan.activations import local_expert_residuals

    cfg, layout = pod
    pairs, local, d, f = 4096 * 6, 16, 4096, 2048

    def kept(rows):
        return rows * d * 2 + 3 * rows * f * 2 + 3 * local * d * f * 2 + 3 * rows * 4 + local * 4

    def by_hand(rows):
        return kept(rows) + rows * d * 2 + 2 * rows * f * 4

    assert local_expert_residuals(cfg.model, local, f, 2 * pairs) == kept(2 * pairs)
    assert P.exchange_bytes(cfg, 16, 1.0) == by_hand(2 * pairs)
    dropless = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, capacity_factor=None))
    assert P.exchange_bytes(dropless, 16, 1.0) == by_hand(16 * pairs)
    assert P.exchange_bytes(cfg, 1, 1.0) == 0
    mem = P.estimate(cfg, layout, P.Activations(0, 0, 0), {"data": 1, "fsdp": 32, "expert": 16, "tensor": 1})
    assert mem.exchange == P.exchange_bytes(cfg, 16, 1.0)


def test_phases_and_the_loop_copy(pod):
    """The estimate's temporaries by hand on v4-flash-pod (fsdp=32 x expert=16, one sequence
    per device): its 43 layers are segments (0, hash) x 2, (4, hash) x 1 and (128, 4) x 20, so
    42 layers run in loops, each keeping its input stream [4096, 4, 4096] in bfloat16 (remat
    full); libtpu's copy is those stacks and the looped layers' parameters; the total is the
    arguments, the largest phase and the copy."""
    from jax.sharding import NamedSharding

    from parallel.mesh import abstract_mesh

    cfg, layout = pod
    assert P.looped_segments(cfg.model) == [0, 2] and P.looped_layers(cfg.model) == 42
    sizes = {"data": 1, "fsdp": 32, "expert": 16, "tensor": 1}
    mem = P.estimate(cfg, layout, P.Activations(0, 0, 0), sizes)
    assert mem.stacks == 42 * 4096 * 4 * 4096 * 2
    mesh = abstract_mesh(sizes)
    looped = [x for i in (0, 2) for x in jax.tree.leaves(layout.params["segments"][i])]
    specs = [s for i in (0, 2) for s in jax.tree.leaves(layout.specs["params"]["segments"][i],
                                                        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))]
    shard = sum(math.prod(NamedSharding(mesh, p).shard_shape(x.shape)) * x.dtype.itemsize for x, p in zip(looped, specs))
    assert shard > 0.9 * 2**30 and mem.loop_copy == mem.stacks + shard
    g = mem.grads + mem.stacks + mem.working + mem.exchange
    assert mem.phases["layer loop"] == g and mem.temporaries == max(mem.phases.values()) + mem.loop_copy
    assert mem.total == mem.arguments + mem.temporaries
    gpu = P.estimate(cfg, layout, P.Activations(0, 0, 0, platform="gpu"), sizes)
    assert gpu.loop_copy == 0 and gpu.total == pytest.approx(mem.arguments + sum(
        getattr(mem, k) for k in ("grads", "saved", "working", "exchange", "logits", "partials")))
    import dataclasses  # without remat every residual is counted in the loop's phase (an upper bound)

    none = dataclasses.replace(cfg, model=cfg.model.replace(remat="none"))
    assert P.estimate(none, layout, P.Activations(3 * 2**30, 0, 0), sizes).stacks == 3 * 2**30


def test_kernel_fill():
    """The share of the ragged receive buffer a balanced routing fills, by hand: v4-flash-pod on
    v5p-1024 (fsdp=32 x expert=16) holds 512 x 4096 / 512 = 4096 tokens per device, 6 experts
    each: 24,576 pairs in a buffer of 2 x 24,576 rows; v4-pro-pod (capacity 1.25): 24,576 of
    30,720; without an expert axis the kernels see exactly the pairs."""
    flash, pro = load_run_config(POD), load_run_config("configs/v4-pro-pod.yaml")
    assert P.kernel_fill(flash, {"data": 1, "fsdp": 32, "expert": 16, "tensor": 1}) == 0.5
    assert P.kernel_fill(pro, {"data": 1, "fsdp": 32, "expert": 64, "tensor": 1}) == 24576 / 30720
    assert P.kernel_fill(flash, {"data": 1, "fsdp": 512, "expert": 1, "tensor": 1}) == 1.0


def test_state_bytes_equal_the_real_sharded_state():
    """On 8 real (CPU) devices with data=2 x expert=2 x tensor=2, the plan's per-device bytes of
    parameters, routing tables and optimiser state equal what `python -m train`'s setup puts
    on the fullest device."""
    from train.setup import setup

    cfg = load_run_config(TINY, ["model.dtype=float32", *SMALL_OVERRIDES])
    mesh = make_mesh(cfg.mesh, cfg.model, global_batch=cfg.data.global_batch)
    rules = Rules(cfg.rules)
    state, _, _ = setup(cfg, mesh, rules)
    want = P.StateLayout(cfg, rules).bytes_per_device(mesh)
    for group in ("params", "rest", "opt"):
        per_device = {}
        for leaf in jax.tree.leaves(getattr(state, group)):
            for shard in leaf.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        assert max(per_device.values()) == want[group], group


def test_activation_residuals_follow_remat():
    """Residuals per sequence: remat=full keeps at least every block's input (the hand-derived
    floor: blocks x seq x hc_mult x dim float32 values) and far less than remat=none;
    save_matmuls lies between; every figure is linear in the batch (1, 2, 3 sequences)."""
    base = load_run_config(TINY, ["model.dtype=float32", "data.seq_len=64", *SMALL_OVERRIDES])
    m = base.model
    per = {}
    for remat in ("none", "save_matmuls", "full"):
        cfg = load_run_config(TINY, ["model.dtype=float32", "data.seq_len=64", *SMALL_OVERRIDES, f"model.remat={remat}"])
        layout = P.StateLayout(cfg, Rules())
        one, two, three = (P.residual_bytes(cfg, layout, n) for n in (1, 2, 3))
        assert three - two == two - one  # linear in the sequences
        per[remat] = P.activations(cfg, layout)
    # traced with the target's kernels' residuals (their inputs), not the host's blocked blocks
    assert [P.traced_impl(*a) for a in (("auto", "tpu"), ("auto", "gpu"), ("batched", "gpu"))] == [
        "tiled", "tiled", "batched"]
    floor = (m.n_layers + m.n_mtp_layers) * 64 * m.hc_mult * m.dim * 4
    assert floor <= per["full"].per_seq < per["save_matmuls"].per_seq < per["none"].per_seq
    assert per["none"].block == 0 and per["full"].block == pytest.approx(
        per["none"].per_seq / (m.n_layers + m.n_mtp_layers))


def test_pod_plan_and_suggestion(pod):
    """v4-flash: the pod config fits v5p-1024 as requested; on v5p-256 (4 sequences per chip)
    it does not, the reason names the activations and a micro-batch count that fits, and with
    that count the estimate fits. --mesh auto on v5p-1024 puts 64 experts per axis."""
    cfg, layout = pod
    lines = []
    assert P.plan(cfg, P.parse_topology("v5p-1024"), cfg.mesh, compile_=False, out=lines.append) == 0
    text = "\n".join(lines)
    assert "mesh: fsdp=32 x expert=16 (requested)" in text and ": fits" in text
    assert "host memory per process about 3.22 GiB (4 local devices" in text  # train.init_from
    lines.clear()
    assert P.plan(cfg, P.parse_topology("v5p-256"), cfg.mesh, compile_=False, out=lines.append) == 1
    text = "\n".join(lines)
    assert "DOES NOT FIT" in text and "activations kept" in text.split("largest: ")[1].splitlines()[0]
    micro = int(text.split("train.micro_batches=")[1].split()[0])
    act = P.activations(cfg, layout)
    sizes = {"data": 1, "fsdp": 8, "expert": 16, "tensor": 1}
    import dataclasses

    smaller = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batches=micro))
    assert P.estimate(smaller, layout, act, sizes).total <= P.FIT_FRACTION * P.CHIPS["v5p"].hbm
    sizes, mem = P.suggest(cfg, layout, act, 512, P.CHIPS["v5p"].hbm)
    assert sizes["expert"] == 64 and sizes["tensor"] == 1 and mem.total <= P.FIT_FRACTION * P.CHIPS["v5p"].hbm
    if sizes["fsdp"] > 1:  # the smallest fsdp that fits: half of it would not
        half = dict(sizes, fsdp=sizes["fsdp"] // 2, data=sizes["data"] * 2)
        assert P.estimate(cfg, layout, act, half).total > P.FIT_FRACTION * P.CHIPS["v5p"].hbm


def test_cli(capsys):
    assert P.main(["--config", POD, "--topology", "v5p-8"]) == 1  # 4 chips: nothing fits, says why
    out = capsys.readouterr().out
    assert "mesh: data*fsdp*expert*tensor" in out or "cannot run" in out
    assert P.main(["--config", POD, "--topology", "v5p-2048x"]) == 2
    assert "expected FAMILY-N" in capsys.readouterr().err
    assert P.main(["--config", POD, "--topology", "gpu:h200x96", "--mesh", "expert=3,fsdp=-1"]) == 1
    assert "n_routed_experts=256 is not divisible by expert=3" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.tpu_aot
@pytest.mark.skipif(not P.libtpu_available(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_aot_compile_for_a_tpu_slice(monkeypatch):
    """The actual train step compiled by libtpu for v5p:2x2x1 on this CPU host: compiled
    argument bytes per device within 10% of the plan's state + batch bytes."""
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    cfg = load_run_config(TINY, ALIGNED)
    topo = P.parse_topology("v5p:2x2x1")
    layout = P.StateLayout(cfg, Rules())
    mesh_cfg = MeshConfig(data=1, fsdp=2, expert=2, tensor=1)
    sizes = mesh_cfg.resolve(topo.devices)
    mem = P.estimate(cfg, layout, P.Activations(0, 0, 0), sizes)
    analysis, flops, seconds = P.compile_step(cfg, layout, topo, mesh_cfg)
    want = mem.params + mem.rest + mem.opt + mem.batch
    assert math.isclose(analysis.argument_size_in_bytes, want, rel_tol=0.10), (analysis, want)
    assert analysis.alias_size_in_bytes > 0.9 * want  # the state is donated: updated in place
    assert flops.dots > 0


@pytest.mark.pod
@pytest.mark.tpu_aot
@pytest.mark.skipif(not P.libtpu_available(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_reduced_depth_pod_compile_agrees_with_the_plan(monkeypatch):
    """configs/v4-flash-pod.yaml at 9 layers (every width, the mesh, batch, Muon, capacity
    factor and chunking as the pod runs them; a hash-routed layer, then four (CSA, HCA) pairs
    run by a layer loop like the full depth's segment: an unlooped 4-layer model's backward
    peak is ~1.7x the looped one's, docs/benchmarks.md) compiled by libtpu for v5p-1024: the
    planner's total is within 15% of the compiled total and both say it fits. ~7-10 min and
    ~15 GB of host memory: `make test-pod`."""
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    cfg = load_run_config(POD, ["model.n_layers=9", "model.compress_ratios=[4,4,128,4,128,4,128,4,128]",
                                "model.n_hash_layers=1"])
    assert P.looped_layers(cfg.model) == 8  # the four pairs run in a layer loop
    topo = P.parse_topology("v5p-1024")
    layout = P.StateLayout(cfg, Rules(cfg.rules))
    sizes = cfg.mesh.resolve(topo.devices)
    mem = P.estimate(cfg, layout, P.activations(cfg, layout), sizes)
    with jax.default_matmul_precision("default"):  # Mosaic refuses bf16 operands at "highest" (conftest)
        analysis, _, _ = P.compile_step(cfg, layout, topo, cfg.mesh)
    compiled = P.compiled_total(analysis)
    assert math.isclose(mem.total, compiled, rel_tol=0.15), f"estimate {mem.total / 2**30:.2f} GiB, compiled {compiled / 2**30:.2f} GiB"
    assert max(mem.total, compiled) <= P.FIT_FRACTION * topo.chip.hbm


def test_v4_pro_pod_config_resolves_on_its_slice():
    """configs/v4-pro-pod.yaml loads and its mesh resolves on tpu7x-2048 to one sequence per
    device (fsdp=32 x expert=64; docs/benchmarks.md has the compiled figures)."""
    from parallel.mesh import validate

    cfg = load_run_config("configs/v4-pro-pod.yaml")
    topo = P.parse_topology("tpu7x-2048")
    sizes = cfg.mesh.resolve(topo.devices)
    assert sizes == {"data": 1, "fsdp": 32, "expert": 64, "tensor": 1}
    validate(sizes, cfg.model, cfg.data.global_batch)
    assert cfg.model.n_routed_experts == 384 and P.check_mesh(cfg, sizes) is None


@pytest.mark.parametrize("chunks", [1, 4])
def test_head_logits_against_the_compiler(chunks):
    """The estimate's loss-head row (the float32 logits of one vocabulary slice and their
    gradient, which train/step.py's head_ce makes slice by slice and never keeps) against
    XLA's temporaries for head_ce's gradient alone: those logits, plus at most the weight's
    re-laid slices and their gradient."""
    import jax.numpy as jnp

    from model import preset
    from plan.memory import head_logit_bytes
    from train.step import head_ce

    b, s, d, v = 2, 256, 64, 8192
    cfg = preset("tiny", vocab_size=v, head_chunks=chunks)
    grad = jax.jit(jax.grad(lambda h, w, t: jnp.sum(head_ce(h, w, t, chunks)[0]), argnums=(0, 1)))
    temp = grad.lower(jax.ShapeDtypeStruct((b, s, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
                      jax.ShapeDtypeStruct((b, s), jnp.int32)).compile().memory_analysis().temp_size_in_bytes
    want = head_logit_bytes(cfg, b * s)
    assert want == 2 * 4 * b * s * v // chunks
    assert want <= temp <= want + (2 * d * v * 4 if chunks > 1 else 0) + 256 * 1024


def test_why_not_names_the_head_logits():
    """When the loss head's logits dominate an estimate over budget, why_not names
    model.head_chunks, and finds the micro-batch count that fits (hand numbers: 2 GiB of
    arguments and the loss head's phase, 1 + 10 GiB per sequence, need 13 GiB of 9 usable; two
    micro-batches halve that phase and add a 1 GiB accumulator: 2 + 1 + 5.5 = 8.5 GiB)."""
    g = P.GiB
    cfg = load_run_config(TINY, [])

    def mem(micro):
        return P.Memory(params=g, rest=0, grads=g, opt=g, batch=0, saved=g / micro, working=g / micro,
                        seqs=4 / micro, partials=0, exchange=0, logits=10 * g / micro,
                        accumulator=g if micro > 1 else 0)

    assert mem(1).total == 13 * g and mem(1).peak_phase == "loss head" and mem(2).total == 8.5 * g
    lines = P.why_not(cfg, mem(1), 10 * g, mem)
    assert lines[0].startswith("needs 13.0 GiB per device") and "loss head logits" in lines[0]
    assert any("model.head_chunks" in line for line in lines)
    assert any("train.micro_batches=2 divides them by 2 and fits" in line for line in lines)


def test_live_ranges_tool(tmp_path):
    """tools/live_ranges.py on a hand-written dump in libtpu's formats: two 100-byte values share
    one slice of the temporaries (a loop's phi and its input: counted once), a 30-byte value
    overlaps the second, a parameter is left out; a forward layer loop carries bf16[2, 4] and
    f32[3] (28 bytes)."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("live_ranges", pathlib.Path(__file__).parents[1] / "tools/live_ranges.py")
    lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lr)
    stem = tmp_path / "module_0000.jit_step.cl_1.after_optimizations"
    pathlib.Path(f"{stem}-buffer-assignment.txt").write_text(
        "BufferAssignment:\n"
        "allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}:\n"
        " value: <1 param.0 @0> (size=64,offset=0): f32[16]{0}\n"
        "allocation 1: size 130, preallocated-temp:\n"
        " value: <2 fusion.1 @0> (size=100,offset=0): f32[25]{0}\n"
        " value: <3 while.2{1} (phi) @0> (size=100,offset=0): f32[25]{0}\n"
        " value: <4 copy.3 @0> (size=30,offset=100): u8[30]{0}\n")
    pathlib.Path(f"{stem}-live-range.txt").write_text(
        "HloLiveRange (max 5):\n  InstructionSequence:\n    0:param.0\n    1:fusion.1\n    2:while.2\n"
        "    3:copy.3\n    4:tuple.4\n  BufferLiveRange:\n    param.0{}:0-4\n    fusion.1{}:1-2\n"
        "    while.2{1}:2-3\n    copy.3{}:3-4\n  Live ranges at 3 (peak):\n")
    pathlib.Path(f"{stem}.txt").write_text(
        '  %while.2 = (bf16[2,4]{1,0}, f32[3]{0}) while(%t), condition=%c, body=%b, '
        'metadata={op_name="jit(step)/jvp()/while"}\n')
    values, temps = lr.read_assignment(f"{stem}-buffer-assignment.txt")
    order, ranges = lr.read_live_ranges(f"{stem}-live-range.txt")
    assert temps == 130 and order == ["param.0", "fusion.1", "while.2", "copy.3", "tuple.4"]
    assert lr.live_bytes(values, ranges, len(order)) == [0, 100, 100, 130, 30]
    ops, loops = lr.read_hlo(f"{stem}.txt")
    assert loops == [("while.2", "jit(step)/jvp()/while", 28)]
