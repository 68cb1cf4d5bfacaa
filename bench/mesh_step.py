"""Forward + backward step time of the tiny model on 8 emulated CPU devices, per mesh.

Usage: python bench/mesh_step.py [--steps N] [--batch B] [--seq S]
Prints a table of step times and their ratio to data=8, all measured side by side in one run.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # glibc's malloc on transparent huge pages (train/host.py), before JAX
    from train.host import tune_malloc

    tune_malloc()

import argparse
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from model import preset  # noqa: E402
from parallel import MeshConfig, Rules, create_sharded, describe, make_mesh, sharded  # noqa: E402

MESHES = [dict(data=8), dict(data=1, fsdp=8), dict(data=1, expert=8), dict(data=2, expert=2, tensor=2),
          dict(data=1, fsdp=2, expert=4), dict(data=1, tensor=2, fsdp=4)]


def loss_fn(m, ids):
    logits, _ = m(ids)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, ids[..., None], -1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    cfg, rules = preset("tiny"), Rules()
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)
    rows = []
    for axes in MESHES:
        mesh = make_mesh(MeshConfig(**axes), cfg, global_batch=args.batch)
        m = create_sharded(cfg, mesh, rules)
        x = jax.device_put(ids, NamedSharding(mesh, rules.spec(("batch", None))))
        with sharded(mesh, rules):
            step = nnx.jit(nnx.value_and_grad(loss_fn))
            t0 = time.perf_counter()
            jax.block_until_ready(step(m, x))
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                jax.block_until_ready(step(m, x))
        rows.append((describe(mesh), (time.perf_counter() - t0) / args.steps, compile_s))
        print(f"  measured {rows[-1][0]}", flush=True)
    base = rows[0][1]
    print(f"\ntiny model, batch {args.batch} x {args.seq} tokens, forward+backward, {args.steps} steps, "
          f"jax {jax.__version__}, 8 emulated CPU devices")
    print("| mesh | step ms | ratio to data=8 | first call (compile) s |")
    print("|---|---|---|---|")
    for name, t, c in rows:
        print(f"| {name} | {1000 * t:.1f} | {t / base:.2f} | {c:.1f} |")


if __name__ == "__main__":
    main()
