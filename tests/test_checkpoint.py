"""Checkpoints, proven by injecting each fault for real.

In-process: fingerprints, corrupt / truncated / deleted files and foreign metadata fall back to
the previous step, a checkpoint of another model names the parameter, a restore onto other
meshes is exact. Subprocesses (`python -m train`, sharing a persistent compilation cache):
kill -9 during an asynchronous save and SIGTERM then resume bit for bit, every document
once per epoch across the interruptions, NaN steps skipped and K of them stopping the run (a
NaN loss weight in the batch: the reference run's program, read from the cache), a read-only
directory and a failing background write reported, a data=2 x expert=2 x tensor=2 checkpoint
restored on data=8 and on 4 devices, and resumed on 4 devices.
"""
import ctypes
import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel import Rules, make_mesh
from parallel.mesh import MeshConfig
from train.checkpoint import (CheckpointError, Checkpointer, ModelMismatch, fingerprints,
                              leaf_paths)
from train.config import load_run_config
from train.setup import setup
from trainer_env import trainer_env

# Reading a damaged step, Orbax gives up on its other arrays' reads, left as coroutines never
# awaited; when the garbage collector finds them they report GeneratorExit. Expected here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS = 12
FAST = ["model.n_layers=2", "model.dtype=float32", "model.compress_ratios=[0,4]", "model.n_hash_layers=1",
        "data.seq_len=32", "data.global_batch=8", "optim.warmup_steps=2", "log.log_every=1",
        "log.tensorboard=false", "log.example_ids=true", f"train.steps={STEPS}"]


# --- helpers --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """A small corpus: about one epoch every 9 steps (70 rows of 33 tokens, 8 rows a step)."""
    d = tmp_path_factory.mktemp("ckpt")
    rng = random.Random(0)
    words = ["thou", "art", "the", "king", "of", "night", "and", "day", "sweet", "rose", "fair"]
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choices(words, k=rng.randint(8, 24)))}) + "\n")
    return d


def overrides(work, run_dir, *extra):
    return [*FAST, "data.source=jsonl", f"data.paths=[{work / 'corpus.jsonl'}]",
            f"log.run_dir={run_dir}", *extra]


def launch(work, run_dir, *extra, env=None, preexec=None):
    cmd = [sys.executable, "-m", "train", "--config", TINY, *overrides(work, run_dir, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=trainer_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=preexec)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def records(run_dir, name="metrics.jsonl"):
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_for(cond, proc, timeout=300):
    t = time.time()
    while not cond():
        assert proc.poll() is None, f"trainer exited early:\n{proc.communicate()[0][-3000:]}"
        assert time.time() - t < timeout, "timed out waiting for the trainer"
        time.sleep(0.005)


def committed(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir)}


@pytest.fixture(scope="session")
def reference(work):
    """An uninterrupted run on the default mesh (data=2 x expert=2 x tensor=2)."""
    run_dir = work / "reference"
    code, out = finish(launch(work, run_dir, "checkpoint.interval_steps=3"))
    assert code == 0, out[-3000:]
    return run_dir


# --- fingerprints ---------------------------------------------------------------------------
def flip_low_bit(x, i, j):
    if x.dtype == jnp.bool_:
        return x.at[i, j].set(~x[i, j])
    uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
    bits = jax.lax.bitcast_convert_type(x, uint)
    return jax.lax.bitcast_convert_type(bits.at[i, j].set(bits[i, j] ^ 1), x.dtype)


def test_fingerprints_see_every_element_and_ignore_sharding():
    mesh = jax.make_mesh((8,), ("x",))
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_):
        x = jnp.asarray(rng.normal(size=(16, 24)) > 0 if dtype == jnp.bool_ else rng.normal(size=(16, 24)) * 9, dtype)
        base = fingerprints({"x": x})["x"]
        sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
        assert fingerprints({"x": sharded})["x"] == base, dtype
        for i, j in ((0, 0), (7, 13), (15, 23)):  # any single element, its lowest bit flipped
            assert fingerprints({"x": flip_low_bit(x, i, j)})["x"] != base, (dtype, i, j)
        swapped = x.at[0, 0].set(x[1, 1]).at[1, 1].set(x[0, 0])
        if x[0, 0] != x[1, 1]:
            assert fingerprints({"x": swapped})["x"] != base, dtype


# --- in-process: a real train state ---------------------------------------------------------
@pytest.fixture(scope="module")
def fast_state(work):
    cfg = load_run_config(TINY, overrides(work, work / "unused"))
    mesh = make_mesh(cfg.mesh, cfg.model, global_batch=cfg.data.global_batch)
    state, _, _ = setup(cfg, mesh, Rules(cfg.rules))
    return cfg, state


def test_abstract_setup_describes_the_real_state(fast_state):
    """setup(abstract=True), what a resume restores into without running the initialiser,
    has every leaf of the state setup() creates: path, shape, dtype and sharding."""
    cfg, state = fast_state
    mesh = make_mesh(cfg.mesh, cfg.model, global_batch=cfg.data.global_batch)
    target, shardings, _ = setup(cfg, mesh, Rules(cfg.rules), abstract=True)
    assert leaf_paths(target) == leaf_paths(state) == leaf_paths(shardings)
    for p, x, t in zip(leaf_paths(state), jax.tree.leaves(state), jax.tree.leaves(target)):
        assert isinstance(t, jax.ShapeDtypeStruct) and (t.shape, t.dtype) == (x.shape, x.dtype), p
        assert t.sharding.is_equivalent_to(x.sharding, x.ndim), (p, t.sharding, x.sharding)


def bumped(state, k):
    """A different state: every float leaf + k (so each saved step is distinguishable)."""
    return jax.tree.map(lambda x: x + k if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def assert_same(a, b):
    assert leaf_paths(a) == leaf_paths(b)
    for p, x, y in zip(leaf_paths(a), jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), p


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _array_files(step_dir):
    return sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
                  key=os.path.getsize)


FAULTS = {
    "flip a byte of the largest array file": lambda d: _flip(_array_files(d)[-1]),
    "truncate an array file": lambda d: _truncate(_array_files(d)[-1]),
    "delete an array file": lambda d: os.remove(_array_files(d)[-1]),
    "delete a whole item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "garbage in our metadata": lambda d: open(os.path.join(d, "meta", "metadata"), "w").write("{not json"),
    "foreign metadata": lambda d: open(os.path.join(d, "meta", "metadata"), "w").write('{"format": "other/1"}'),
    "garbage in Orbax's metadata": lambda d: open(os.path.join(d, "state", "_METADATA"), "w").write("\x00" * 9),
    "edited data position": lambda d: open(os.path.join(d, "data", "metadata"), "w").write('{"version": 1}'),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_step_falls_back_to_the_previous_one(fast_state, tmp_path, fault):
    cfg, state = fast_state
    ck = Checkpointer(str(tmp_path / "ck"), cfg.checkpoint)
    for step in (1, 2):
        ck.save(step, bumped(state, step), {"position": step})
    ck.close()
    FAULTS[fault](str(tmp_path / "ck" / "2"))
    said = []
    ck = Checkpointer(str(tmp_path / "ck"), cfg.checkpoint, log=said.append)
    step, restored, data = ck.restore_latest(state)
    assert step == 1 and data == {"position": 1}
    assert_same(restored, bumped(state, 1))
    assert len(said) == 1 and said[0].startswith("checkpoint: step 2: ") and "falling back" in said[0], said
    if "flip" in fault and "fingerprint" in said[0]:  # a changed value (not a decode error) names its leaf
        assert any(f"leaf {p} " in said[0] for p in leaf_paths(state)), said
    assert ck.steps() == [1] and os.listdir(str(tmp_path / "ck") + ".corrupt")  # moved aside, kept
    ck.save(2, bumped(state, 5), {"position": 2})  # the run goes on and can save step 2 again
    ck.close()


def test_no_good_step_is_an_error_not_a_fresh_start(fast_state, tmp_path):
    cfg, state = fast_state
    ck = Checkpointer(str(tmp_path / "ck"), cfg.checkpoint)
    ck.save(4, state, {})
    ck.close()
    _flip(_array_files(str(tmp_path / "ck" / "4"))[-1])
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .* steps \[4\]"):
        Checkpointer(str(tmp_path / "ck"), cfg.checkpoint, log=lambda s: None).restore_latest(state)


def test_another_model_names_the_parameter(fast_state, tmp_path):
    from flax import nnx

    from model import build
    from train.optim import make_optimizer
    from train.state import init_state

    cfg, state = fast_state
    ck = Checkpointer(str(tmp_path / "ck"), cfg.checkpoint, cfg.to_dict())
    ck.save(3, state, {})
    ck.close()

    def abstract(run_cfg):
        def make():
            model = build(run_cfg.model, rngs=nnx.Rngs(0))
            return init_state(model, make_optimizer(run_cfg.optim, 10, nnx.state(model, nnx.Param)))[1]
        return jax.eval_shape(make)

    wider = load_run_config(TINY, overrides(tmp_path, tmp_path, "model.moe_inter_dim=48"))
    ck = Checkpointer(str(tmp_path / "ck"), wider.checkpoint, wider.to_dict())
    with pytest.raises(ModelMismatch, match=r"step 3 .* does not fit this run: params/.*w1/w is float32\[64, 32\] "
                                            r"in the checkpoint, float32\[64, 48\] here .*model.moe_inter_dim: 32 -> 48"):
        ck.restore_latest(abstract(wider))
    adamw = load_run_config(TINY, overrides(tmp_path, tmp_path, "optim.name=adamw"))
    with pytest.raises(ModelMismatch, match=r"opt/.* is in the checkpoint but not in this run|"
                                            r"opt/.* is in this run but not in the checkpoint"):
        Checkpointer(str(tmp_path / "ck"), adamw.checkpoint, adamw.to_dict()).restore_latest(abstract(adamw))
    assert Checkpointer(str(tmp_path / "ck"), cfg.checkpoint).steps() == [3]  # nothing moved aside


def test_retention_and_intervals(tmp_path, monkeypatch):
    from train.config import CheckpointConfig

    state = {"w": jnp.arange(6.0)}
    monkeypatch.chdir(tmp_path)  # a relative directory, as in configs/tiny.yaml's runs/tiny
    ck = Checkpointer("ck", CheckpointConfig(keep=2, keep_every=3))
    for step in range(1, 8):
        ck.save(step, jax.tree.map(lambda x: x + step, state), {})
    ck.close()
    assert Checkpointer(str(tmp_path / "ck"), CheckpointConfig()).steps() == [3, 6, 7]  # every 3rd + newest 2
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    ck = Checkpointer(str(tmp_path / "ck2"), CheckpointConfig(interval_steps=4, interval_minutes=2))
    assert [s for s in range(1, 10) if ck.due(s)] == [4, 8]
    now[0] += 121
    assert ck.due(5)  # two minutes since the last save (here: since start)
    ck.close()


def _no_dac_override():
    """preexec_fn: a root child loses CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from its bounding
    set, so file permissions bind it as they bind any user (CI runs as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.multiprocess
def test_read_only_directory_is_reported_before_training(work, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    os.chmod(run_dir / "checkpoints", 0o555)
    try:
        code, out = finish(launch(work, run_dir, preexec=_no_dac_override if os.geteuid() == 0 else None))
    finally:
        os.chmod(run_dir / "checkpoints", 0o755)
    assert code == 4, out[-3000:]
    assert "checkpoint error: checkpoint.dir" in out and "is not writable" in out and "Permission denied" in out
    assert "step 1/" not in out  # it stopped before training, not after pretending to save


SAVE_SCRIPT = """
import sys, jax.numpy as jnp
from train.checkpoint import Checkpointer, CheckpointError
from train.config import CheckpointConfig
ck = Checkpointer(sys.argv[1], CheckpointConfig())
ck.save(1, {"w": jnp.arange(100_000.0)}, {})
print("save returned")
try:
    ck.close()
except CheckpointError as e:
    print("raised:", e)
"""


@pytest.mark.multiprocess
def test_failing_background_write_surfaces(tmp_path):
    """The file-size limit makes the array write fail inside Orbax's background thread, as a
    full disk would; the error must reach the caller at close() (or the next save)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    out = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path / "ck")], cwd=ROOT, text=True,
                         capture_output=True, preexec_fn=limit, timeout=300).stdout
    assert "save returned" in out and "raised: background save of step 1" in out and "File too large" in out, out
    assert not [n for n in os.listdir(tmp_path / "ck") if n.isdigit()]  # no step pretends to exist


# --- subprocess: kill -9, SIGTERM, resume ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_and_sigterm_then_resume_bit_for_bit(work, reference):
    run_dir = work / "interrupted"
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    # 1. kill -9 while the asynchronous save of step 6 is being written (its temporary
    #    directory exists; step 3 is committed, steps 4-6 ran after it)
    proc = launch(work, run_dir, "checkpoint.interval_steps=3")
    wait_for(lambda: 3 in committed(run_dir) and any("tmp" in n for n in os.listdir(ckpt_dir)), proc)
    proc.kill()
    proc.wait()
    assert all(n.isdigit() or "tmp" in n or n.startswith(".") for n in os.listdir(ckpt_dir))
    assert max(committed(run_dir)) < STEPS
    # 2. SIGTERM after two more steps: saves the step it reached and exits 0
    resume_at, started = max(committed(run_dir), default=0), time.time()
    proc = launch(work, run_dir, "checkpoint.interval_steps=3")
    metrics = os.path.join(run_dir, "metrics.jsonl")  # rewritten (trimmed) by the resumed run
    wait_for(lambda: os.path.getmtime(metrics) > started and
             max((r["step"] for r in records(run_dir)), default=0) >= resume_at + 2, proc)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0 and "SIGTERM: checkpointed step" in out, out[-3000:]
    stopped = int(out.split("SIGTERM: checkpointed step ")[1].split(";")[0])
    assert committed(run_dir)[-1] == stopped < STEPS, (committed(run_dir), out[-3000:])
    # 3. resume to the end
    code, out = finish(launch(work, run_dir, "checkpoint.interval_steps=3"))
    assert code == 0 and f"resumed from step {stopped}" in out, out[-3000:]
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    assert got == want  # every step's loss, as exact float bits
    assert records(run_dir, "examples.jsonl") == records(reference, "examples.jsonl")
    assert not os.path.exists(os.path.join(reference, "profile"))  # no --profile, no trace


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_document_once_per_epoch(work, reference):
    """The examples log (equal across the interrupted run, above) shows epoch 1 complete before
    any document repeats, each document in one contiguous run of steps."""
    seen = {}
    for r in records(reference, "examples.jsonl"):
        for doc in r["tokens"]:
            seen.setdefault(int(doc), []).append(r["step"])
    assert sorted(seen) == list(range(30))

    def runs(steps):
        out = [[steps[0]]]
        for s in steps[1:]:
            (out[-1].append(s) if s == out[-1][-1] + 1 else out.append([s]))
        return out

    first = {d: runs(s)[0] for d, s in seen.items()}
    second = {d: runs(s)[1] for d, s in seen.items() if len(runs(s)) > 1}
    assert second, "the run should reach the second epoch"
    assert max(r[0] for r in first.values()) <= min(r[0] for r in second.values())
    assert all(len(runs(s)) <= 2 for s in seen.values())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_nan_steps_are_skipped_and_k_of_them_stop_the_run(work):
    run_dir = work / "nan"
    code, out = finish(launch(work, run_dir, "checkpoint.interval_steps=2", "train.max_bad_steps=3",
                              env={"DEEPFLAX_FAULT_NAN_STEPS": "3,8-10"}))
    assert code == 3 and "stopping: 3 consecutive steps with a non-finite" in out, out[-3000:]
    rec = {r["step"]: r for r in records(run_dir)}
    assert rec[4]["skipped_steps"] == 1 and rec[4]["bad_streak"] == 1 and not np.isfinite(rec[4]["grad_norm"])
    assert "fault injection: NaN loss weights at steps [3, 8, 9, 10]" in out
    assert rec[5]["bad_streak"] == 0 and np.isfinite(rec[5]["loss"]) and rec[11]["bad_streak"] == 3
    assert committed(run_dir)[-1] == 8  # steps 9-11 were bad: nothing after step 8 was saved
    assert "step 4: not checkpointed" in out


@pytest.mark.slow
def test_nan_step_leaves_the_state_bit_for_bit(work, fast_state):
    """One jitted step on a batch with a NaN loss weight (what DEEPFLAX_FAULT_NAN_STEPS injects):
    loss and gradient norm are NaN; params, biases and optimiser state are the input's exactly;
    step advances, both bad-step counters count it."""
    from parallel import sharded
    from train.data import make_iterator

    cfg = load_run_config(TINY, overrides(work, work / "unused", "mesh.expert=1", "mesh.tensor=1",
                                          "mesh.data=1"))
    mesh = make_mesh(cfg.mesh, cfg.model, devices=jax.devices()[:1], global_batch=8)
    _, shardings, step_fn = setup(cfg, mesh, Rules(cfg.rules), abstract=True)
    state = jax.device_put(fast_state[1], shardings)  # the module's state, on one device
    batch = {k: np.asarray(v) for k, v in next(make_iterator(cfg.data)).items() if k != "doc_ids"}
    batch["loss_mask"][3, 5] = np.nan
    with sharded(mesh, Rules(cfg.rules), "auto", None):
        new, metrics = jax.jit(step_fn)(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert not np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    for part in ("params", "rest", "opt"):
        assert_same(getattr(new, part), getattr(state, part))
    assert (int(new.step), int(new.bad), int(new.skipped)) == (1, 1, 1)


# --- another mesh, another device count -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_restore_onto_other_meshes_is_exact(work, reference):
    """The reference run's (data=2 x expert=2 x tensor=2) step 6 restored onto data=8 and onto
    4 devices: the same values, on the target's devices."""
    assert committed(reference) == [6, 9, 12]  # interval 3, the newest 3 kept
    cfg = load_run_config(TINY, overrides(work, work / "unused"))
    restored = {}
    for name, mesh_cfg, devices in (("data8", MeshConfig(data=8, expert=1, tensor=1), jax.devices()),
                                    ("4 devices", MeshConfig(data=2, expert=2), jax.devices()[:4])):
        mesh = make_mesh(mesh_cfg, cfg.model, devices=devices, global_batch=8)
        target, _, _ = setup(cfg, mesh, Rules(cfg.rules), abstract=True)
        ck = Checkpointer(os.path.join(reference, "checkpoints"), cfg.checkpoint)
        restored[name], _ = ck.restore(6, target)  # verifies every leaf's fingerprint too
        ck.close()
        assert {d for x in jax.tree.leaves(restored[name]) for d in x.sharding.device_set} == set(devices)
    assert_same(restored["data8"], restored["4 devices"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_on_another_mesh_continues_the_run(work, reference, tmp_path):
    """The reference's step 6 resumed by a trainer on 4 devices (data=2 x expert=2): another mesh
    and another device count (the exact restore onto data=8 is in-process, above)."""
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(reference, "checkpoints", "6"), run_dir / "checkpoints" / "6")
    code, out = finish(launch(work, run_dir, "train.devices=4", "mesh.data=2", "mesh.expert=2", "mesh.tensor=1",
                              "checkpoint.interval_steps=6"))
    assert code == 0 and "resumed from step 6" in out, out[-3000:]
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(7, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)
