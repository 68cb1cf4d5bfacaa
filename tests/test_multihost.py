"""Several processes: the trainer as 2 processes x 4 CPU devices on 127.0.0.1 (gloo), against
the 1-process 8-device run; SIGTERM to one process; its checkpoint resumed on 1 process;
different configurations on different processes; how a launch is detected."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from train.distributed import DistributedError, Launch, detect
from trainer_env import trainer_env

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS = 12  # the programs equal tests/test_checkpoint.py's: the session's compilation cache serves both
COMMON = ["model.n_layers=2", "model.dtype=float32", "model.compress_ratios=[0,4]",
          "model.n_hash_layers=1", "data.seq_len=32", "data.global_batch=8", "data.num_shards=2",
          "optim.warmup_steps=2", "log.log_every=1", "log.tensorboard=false", f"train.steps={STEPS}",
          "checkpoint.interval_steps=4"]


# --- launch detection (pure) ----------------------------------------------------------------
def test_detect_modes():
    assert detect(env={}) == Launch("single")
    assert detect("10.0.0.1:1234", 4, 2, env={}) == Launch("explicit", "10.0.0.1:1234", 4, 2)
    env = {"DEEPFLAX_COORDINATOR": "h:1", "DEEPFLAX_NUM_PROCESSES": "2", "DEEPFLAX_PROCESS_ID": "1"}
    assert detect(env=env) == Launch("explicit", "h:1", 2, 1)
    assert detect(process_id=0, env=env).process_id == 0  # a flag beats the variable
    assert detect(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}).mode == "slurm"
    assert detect(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).mode == "single"
    assert detect(env={"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}).mode == "cloud-tpu"
    assert detect(env={"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "single"
    assert detect(env={"MEGASCALE_COORDINATOR_ADDRESS": "c:8080"}).mode == "cloud-tpu"
    with pytest.raises(DistributedError, match=r"missing \['--num-processes', '--process-id'\]"):
        detect("h:1", env={})
    with pytest.raises(DistributedError, match=r"--process-id 2 is not in \[0, 2\)"):
        detect("h:1", 2, 2, env={})


# --- real processes -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir, *extra, processes=2, timeout=120, per_process=()):
    """Launch the trainer: 1 process x 8 devices, or `processes` x 8/processes devices."""
    port, procs = free_port(), []
    for i in range(processes):
        dist = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                          str(processes), "--process-id", str(i), "--init-timeout", str(timeout)]
        cmd = [sys.executable, "-m", "train", "--config", TINY, *dist, *COMMON,
               f"train.devices={8 // processes}", f"log.run_dir={run_dir}", *extra,
               *(per_process[i] if per_process else ())]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=trainer_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    codes, outs = finish(start(run_dir, processes=1))
    assert codes == [0], outs[0][-3000:]
    return run_dir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The 2-process run from step 0, SIGTERM to process 1 after 4 steps: both processes save
    the step they reached (one checkpoint) and exit 0. (run_dir, outputs, the saved step)."""
    run_dir = tmp_path_factory.mktemp("two")
    procs = start(run_dir, "checkpoint.interval_steps=100")
    wait_for_steps(run_dir, procs, 4)
    procs[1].send_signal(signal.SIGTERM)
    codes, outs = finish(procs)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    saved = int(outs[0].split("SIGTERM: checkpointed step ")[1].split(";")[0])
    return run_dir, outs, saved


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_equal_one(one_process, two_processes):
    """Every step the 2-process run took (from its sharded initialisation on) has the 1-process
    run's loss; only process 0 reports; SIGTERM to process 1 saved one step on both."""
    run_dir, outs, saved = two_processes
    assert "explicit: process 1 of 2" in outs[1]
    assert f"step {saved}/{STEPS}" in outs[0] and f"step {saved}/" not in outs[1]  # only process 0 reports
    assert 4 <= saved < STEPS and os.listdir(run_dir / "checkpoints") == [str(saved)]
    one, two = losses(one_process), losses(run_dir)
    assert sorted(one) == list(range(1, STEPS + 1)) and sorted(two) == list(range(1, saved + 1))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(two)], rtol=1e-6)


def wait_for_steps(run_dir, procs, n):
    """Until metrics.jsonl has `n` records (a resumed run rewrites it first)."""
    metrics, t = os.path.join(run_dir, "metrics.jsonl"), time.time()
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= n):
        assert time.time() - t < 400 and all(p.poll() is None for p in procs), "trainers exited early"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_checkpoint_of_two_processes_resumes_on_one(one_process, two_processes, tmp_path):
    """The 2-process run's SIGTERM checkpoint resumes on 1 process: the losses of the steps
    after it are the 1-process run's. (A 1-process checkpoint restored onto other device
    counts and meshes: tests/test_checkpoint.py.)"""
    two_dir, _, saved = two_processes
    run_dir = tmp_path / "on1"
    shutil.copytree(two_dir / "checkpoints" / str(saved), run_dir / "checkpoints" / str(saved))
    codes, outs = finish(start(run_dir, processes=1))
    assert codes == [0] and f"resumed from step {saved}" in outs[0], outs[0][-3000:]
    got, want = losses(run_dir), losses(one_process)
    assert sorted(got) == list(range(saved + 1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-6)


@pytest.mark.multiprocess
def test_different_configs_fail_clearly(tmp_path):
    t = time.time()
    codes, outs = finish(start(tmp_path / "mixed", per_process=[["optim.lr=1e-3"], ["optim.lr=2e-3"]]), timeout=300)
    assert codes == [5, 5], "\n".join(o[-3000:] for o in outs)
    assert all("the processes run different configurations: processes [1] differ from process 0" in o
               for o in outs)
    assert time.time() - t < 120


def test_pod_config_of_the_launch_recipes_resolves():
    """configs/v4-flash-pod.yaml (launch/) loads, and its mesh resolves on the recipes' pods."""
    from parallel.mesh import validate
    from train.config import load_run_config

    cfg = load_run_config(os.path.join(ROOT, "configs", "v4-flash-pod.yaml"))
    for chips, fsdp in ((256, 16), (64, 4)):  # v5p-512, v5p-128 (4x4x4, the GKE JobSet)
        sizes = cfg.mesh.resolve(chips)
        assert sizes == {"data": 1, "fsdp": fsdp, "expert": 16, "tensor": 1}
        validate(sizes, cfg.model, cfg.data.global_batch)
    for recipe in ("tpu-vm.sh", "slurm.sbatch", "gke-jobset.yaml"):
        assert "configs/v4-flash-pod.yaml" in open(os.path.join(ROOT, "launch", recipe)).read()
