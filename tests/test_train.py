"""The training loop: loss terms by hand, the optimiser partition, balancing, accumulation,
determinism, and a short run of the real `python -m train` path."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import ModelAux, build
from model.transformer import layer_block, update_routing_bias
from train.config import load_run_config
from train.data import make_iterator
from train.main import run
from train.metrics import read_events
from train.optim import make_optimizer, muon_partition
from train.state import init_state
from train.step import denominators, loss_sums, make_grad_fn, make_train_step, total_loss

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def small_cfg(*overrides):
    return load_run_config(TINY, ["train.steps=10", "optim.warmup_steps=0", "data.global_batch=16",
                                  "data.seq_len=32", "model.dtype=float32", *overrides])


def first_batch(cfg):
    b = next(make_iterator(cfg.data))
    return {k: jnp.asarray(b[k]) for k in ("inputs", "targets", "segment_ids", "loss_mask")}


def test_loss_terms_by_hand():
    cfg = small_cfg().model.replace(n_layers=2, compress_ratios=(0, 4), n_hash_layers=1, n_mtp_layers=1)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    mtp = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    mask = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], np.float32)
    f, p = rng.uniform(size=(3, 2, 4)), rng.uniform(size=(3, 2, 4))
    kl, queries = np.array([0.0, 2.5, 0.0]), np.array([0, 6, 0])
    aux = ModelAux((jnp.asarray(mtp),), jnp.zeros((3, 4), jnp.int32), jnp.asarray(f), jnp.asarray(p),
                   jnp.asarray(kl), jnp.asarray(queries), jnp.zeros((3,), jnp.int32))
    batch = {"targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask)}
    sums = loss_sums(jnp.asarray(logits), aux, batch, cfg)

    def ce(lg, t):
        lse = np.log(np.exp(lg).sum(-1))
        return lse - np.take_along_axis(lg, t[..., None], -1)[..., 0], lse

    c, lse = ce(logits.astype(np.float64), targets)
    mtp_t = np.pad(targets[:, 1:], ((0, 0), (0, 1)))
    mtp_m = mask * np.pad(mask[:, 1:], ((0, 0), (0, 1)))  # t -> t+1 -> t+2 all in one document
    c2, _ = ce(mtp.astype(np.float64), mtp_t)
    np.testing.assert_allclose(sums["ce"], (c * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["z"], (lse ** 2 * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["mtp"], (c2 * mtp_m).sum(), rtol=1e-5)
    # balance: score-routed layers only (layer 0 is hash-routed), averaged over them
    np.testing.assert_allclose(sums["balance"], ((f * p).sum((1, 2))[1:]).mean(), rtol=1e-5)
    np.testing.assert_allclose(sums["kl"], 2.5, rtol=1e-6)
    denoms = denominators(batch, cfg)
    assert float(denoms["ce"]) == mask.sum() and float(denoms["mtp"]) == mtp_m.sum()
    weights = {"ce": 1.0, "mtp": 0.3, "z": 1e-4, "balance": 1e-4, "kl": 1.0}
    loss, _ = total_loss(sums, denoms, weights)
    want = ((c * mask).sum() / mask.sum() + 0.3 * (c2 * mtp_m).sum() / mtp_m.sum()
            + 1e-4 * (lse ** 2 * mask).sum() / mask.sum() + 1e-4 * ((f * p).sum((1, 2))[1:]).mean() / 2
            + 2.5 / 10)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_muon_partition():
    cfg = small_cfg()
    params = nnx.state(build(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
    dims = {"/".join(map(str, path)): d for path, d in
            nnx.to_flat_state(nnx.State(muon_partition(params)))}
    adam = {k for k, d in dims.items() if d is None}
    muon = set(dims) - adam
    for key in ("embed", "head/w", "norm/weight", "hc_head/fn"):
        assert key in adam
    # AdamW: embedding, head, norm weights, mHC projections / biases / scales, sinks, positional biases
    assert all(k == "head/w" or k.split("/")[-1] in ("embed", "weight", "sink", "ape", "base", "scale", "fn")
               for k in adam), adam
    assert all("hc" in k for k in adam if k.endswith("/fn"))
    for key in ("attn/wq_a/w", "attn/wq_b/w", "attn/wkv/w", "attn/wo_a/w", "attn/wo_b/w", "ffn/w1",
                "ffn/w2", "ffn/gate/w", "ffn/shared_w1/w", "attn/indexer/wq_b/w", "attn/compressor/wkv/w"):
        assert any(k.endswith(key) for k in muon), key
    stacked = dims["segments/2/blocks/1/attn/wq_b/w"]  # [layers, q_lora_in, heads, head_dim]
    assert (stacked.reduction_axis, stacked.output_axis) == ((1,), (2, 3))
    wo_a = dims["segments/0/blocks/0/attn/wo_a/w"]  # [groups, in, o_lora]: one matrix per group
    assert (wo_a.reduction_axis, wo_a.output_axis) == ((1,), (2,))
    wo_b = dims["segments/0/blocks/0/attn/wo_b/w"]  # [groups, o_lora, embed]: groups are inputs
    assert (wo_b.reduction_axis, wo_b.output_axis) == ((0, 1), (2,))


@pytest.fixture(scope="module")
def single_device_steps():
    cfg = small_cfg("optim.weight_decay=0.0")
    model = build(cfg.model, rngs=nnx.Rngs(0))
    tx = make_optimizer(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param))
    graphdef, state = init_state(model, tx)
    one = jax.jit(make_train_step(graphdef, tx, cfg))
    return cfg, graphdef, state, one, first_batch(cfg)


def test_gradient_accumulation_equals_one_big_batch(single_device_steps):
    cfg, graphdef, state, _, batch = single_device_steps
    grads = {}
    for m in (1, 4):
        fn = make_grad_fn(graphdef, small_cfg(f"train.micro_batches={m}"))
        grads[m] = jax.jit(fn)(state.params, state.rest, batch, state.step)
    (g1, s1, *_, c1, _), (g4, s4, *_, c4, _) = grads[1], grads[4]
    for k in s1:
        np.testing.assert_allclose(s1[k], s4[k], rtol=1e-5, err_msg=k)
    np.testing.assert_array_equal(c1, c4)
    flat1, flat4 = jax.tree.leaves(g1), jax.tree.leaves(g4)
    scale = max(float(jnp.abs(x).max()) for x in flat1)
    for x, y in zip(flat1, flat4):  # per leaf, relative to the leaf (floored at 1% of the largest)
        assert float(jnp.abs(x - y).max()) <= 1e-5 * max(float(jnp.abs(x).max()), 0.01 * scale)


def test_remat_gives_the_same_gradients(single_device_steps):
    """model.remat=full recomputes each block's forward in the backward: the gradients equal
    remat=none's (float32; save_matmuls takes the same nnx.remat path with a policy)."""
    cfg, graphdef, state, _, batch = single_device_steps
    full = small_cfg("optim.weight_decay=0.0", "model.remat=full")
    gdef = nnx.split(build(full.model, rngs=nnx.Rngs(0)), nnx.Param, ...)[0]
    args = (state.params, state.rest, batch, state.step)
    want = jax.tree.leaves(jax.jit(make_grad_fn(graphdef, cfg))(*args)[0])
    got = jax.tree.leaves(jax.jit(make_grad_fn(gdef, full))(*args)[0])
    scale = max(float(jnp.abs(x).max()) for x in want)
    for x, y in zip(want, got):  # per leaf, relative to the leaf (floored at 1% of the largest)
        assert float(jnp.abs(x - y).max()) <= 1e-5 * max(float(jnp.abs(x).max()), 0.01 * scale)


def test_muon_and_adamw_step_sizes(single_device_steps):
    """First step, no weight decay: a Muon matrix moves by an RMS of lr * 0.18 (orthogonalised
    and rescaled); an AdamW parameter by about lr per element (Adam's first step)."""
    cfg, _, state, one, batch = single_device_steps
    new, _ = one(state, batch)
    lr = cfg.optim.lr
    dq = new.params["segments"][2]["blocks"][0]["attn"]["wq_a"]["w"] - state.params["segments"][2]["blocks"][0]["attn"]["wq_a"]["w"]
    rms = float(jnp.sqrt(jnp.mean(dq[0] ** 2)))
    assert 0.7 * 0.18 * lr < rms < 1.3 * 0.18 * lr
    de = new.params["norm"]["weight"] - state.params["norm"]["weight"]
    np.testing.assert_allclose(jnp.abs(de), lr, rtol=0.05)


def test_bias_update_moves_load_towards_balance():
    cfg = small_cfg().model.replace(n_mtp_layers=0)
    model = build(cfg, rngs=nnx.Rngs(0))
    skew = jnp.linspace(0.0, 0.05, cfg.n_routed_experts)  # router scores differ by ~0.01: a strong skew
    for seg in model.segments:
        for blk in seg.blocks:
            if hasattr(blk.ffn, "bias"):
                blk.ffn.bias.set_value(blk.ffn.bias.get_value() + skew)
    ids = jax.random.randint(jax.random.key(0), (4, 64), 0, cfg.vocab_size)
    fwd = nnx.jit(lambda m, x: m(x)[1].expert_counts)

    def imbalance(c):  # max over score-routed layers of max / mean load
        c = c[cfg.n_hash_layers:]
        return float(jnp.max(c.max(-1) / c.mean(-1)))

    counts = fwd(model, ids)
    before = imbalance(counts)
    hashed = np.asarray(layer_block(model, 0).ffn.tid2eid.get_value())
    first_bias = np.asarray(layer_block(model, cfg.n_hash_layers).ffn.bias.get_value())
    update_routing_bias(model, counts, 0.002)
    moved = np.asarray(layer_block(model, cfg.n_hash_layers).ffn.bias.get_value()) - first_bias
    c = np.asarray(counts[cfg.n_hash_layers])
    np.testing.assert_allclose(moved, -0.002 * np.sign(c - c.mean()), atol=1e-7)  # the V3 rule
    for _ in range(30):
        counts = fwd(model, ids)
        update_routing_bias(model, counts, 0.002)
    assert before > 1.5 and imbalance(fwd(model, ids)) < 0.7 * before
    np.testing.assert_array_equal(layer_block(model, 0).ffn.tid2eid.get_value(), hashed)


SHORT = ["train.steps=8", "optim.warmup_steps=2", "log.log_every=1", "log.profile_steps=[2,3]"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs = []
    for name in ("a", "b"):  # run "a" also writes a profiler trace of steps 2..3
        d = tmp_path_factory.mktemp(name)
        cfg = load_run_config(TINY, SHORT + [f"log.run_dir={d}"])
        assert run(cfg, profile=name == "a") == 0
        runs.append((d, [json.loads(line) for line in open(d / "metrics.jsonl")]))
    return runs


def test_short_run_of_the_real_path_learns_and_logs(two_runs):
    d, records = two_runs[0]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    for key in ("ce", "mtp", "balance", "kl", "z", "grad_norm", "lr", "tokens_per_s", "mfu",
                "expert_load_max_over_mean", "dropped_tokens"):
        assert np.isfinite(records[-1][key]), key
    events = read_events(next((d / "tb").iterdir()))
    assert [s for s, v in events if "loss" in v] == list(range(1, 9))
    assert load_run_config(str(d / "config.yaml")) == load_run_config(TINY, SHORT + [f"log.run_dir={d}"])
    assert list((d / "profile").rglob("*.xplane.pb")), "no profiler trace"
    assert not (two_runs[1][0] / "profile").exists()
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["8"]  # the final save


def test_same_seed_gives_bitwise_identical_losses(two_runs):
    (_, a), (_, b) = two_runs
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_plot_and_event_file_format(two_runs, tmp_path):
    from train.metrics import crc32c
    from train.plot import main as plot_main

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value TFRecord framing relies on
    d, _ = two_runs[0]
    out = tmp_path / "loss.png"
    assert plot_main([str(d), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot_main([str(tmp_path / "missing")]) == 2


def test_export_cli_writes_the_runs_newest_checkpoint(two_runs, tmp_path):
    """`python -m model.export RUN_DIR OUT --format deepseek`: the trained parameters of the
    run's last checkpoint (step 8), not the initial ones, read back by load_pretrained."""
    from model import load_pretrained
    from model.export import main as export
    from train.main import restore_run

    d, _ = two_runs[0]
    out = tmp_path / "out"
    assert export([str(d), str(out), "--format", "deepseek", "--dtype", "float32"]) == 0
    got = load_pretrained(out)
    ref, cfg, step = restore_run(d)
    assert step == 8
    fresh = build(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    g, r, f = (dict(nnx.to_flat_state(nnx.state(m, nnx.Param))) for m in (got, ref, fresh))
    assert set(g) == set(r)
    moved = 0
    for k in g:
        np.testing.assert_array_equal(np.asarray(g[k].get_value()), np.asarray(r[k].get_value()), err_msg=str(k))
        moved += not np.array_equal(np.asarray(g[k].get_value()), np.asarray(f[k].get_value()))
    assert moved > len(g) // 2  # trained, not the initial values
    assert export([str(d), str(out)]) == 2  # an existing export is not overwritten
    assert export([str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
