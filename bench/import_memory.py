"""Peak host memory of `model.load_pretrained` against the size of the checkpoint it reads.

    python bench/import_memory.py [--dir /tmp/import-bench] [--expert 8]

Writes (once) a DeepSeek-named bf16 checkpoint of a ~1.7 GB model (`small` widened: dim 1024,
64 experts of 512, 8 layers) with model.export, then, in a fresh process with 8 emulated CPU
devices, imports it onto a mesh (expert axis `--expert`, fsdp the rest) and prints the peak
resident memory. On CPU devices the imported parameters themselves live in host memory, so the
loader's own footprint is peak - (RSS before) - (bytes of the placed parameters); the last
column is what `python -m plan` prints for it (plan.state.import_host_bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = dict(dim=1024, moe_inter_dim=512, n_routed_experts=64, q_lora_rank=256, o_lora_rank=256)


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 2**20


def write(path: Path) -> None:
    from flax import nnx

    from model import build, preset
    from model.export import save

    m = build(preset("small", **OVERRIDES), rngs=nnx.Rngs(0))
    save(m, path, "deepseek", "bf16", shard_bytes=512 << 20)


def child(path: str, expert: int) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from model import abstract, load_pretrained, preset
    from parallel import MeshConfig, Rules, make_mesh
    from plan.state import import_host_bytes

    cfg = preset("small", **OVERRIDES)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8 // expert, expert=expert), cfg)
    jax.block_until_ready(jax.device_put(np.zeros(8)))  # backend up before the baseline
    sizes = [int(np.prod(v.get_value().shape)) * 4 for _, v in nnx.to_flat_state(nnx.state(abstract(cfg)))]
    shard, source = import_host_bytes(nnx.state(abstract(cfg), nnx.Param), Rules(), mesh, jax.local_device_count())
    before = _rss_gib()
    m = load_pretrained(path, mesh=mesh, dtype="float32")
    jax.block_until_ready(nnx.state(m))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"before": before, "peak": peak, "params": sum(sizes) / 2**30,
                      "largest": max(sizes) / 2**30,
                      "planned": (jax.local_device_count() * shard + source) / 2**30}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/import-bench")
    ap.add_argument("--expert", type=int, default=8)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    path = Path(args.dir)
    if args.child:
        child(str(path), args.expert)
        return 0
    if not (path / "config.json").is_file():
        print(f"writing the checkpoint to {path} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--dir", str(path), "--expert", "0"], check=True,
                       env={**os.environ, "BENCH_WRITE": "1", "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    ckpt = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, __file__, "--dir", str(path), "--expert", str(args.expert), "--child"],
                         check=True, env=env, cwd=ROOT, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    loader = r["peak"] - r["before"] - r["params"]
    print("| checkpoint (bf16) | parameters placed (f32) | largest parameter (f32) | RSS before | peak RSS "
          "| loader's own peak | planner's figure (python -m plan) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {ckpt:.2f} GiB | {r['params']:.2f} GiB | {r['largest']:.2f} GiB | {r['before']:.2f} GiB "
          f"| {r['peak']:.2f} GiB | {loader:.2f} GiB | {r['planned']:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if os.environ.get("BENCH_WRITE"):
        write(Path(sys.argv[sys.argv.index("--dir") + 1]))
        sys.exit(0)
    sys.exit(main())
