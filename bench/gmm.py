"""Grouped matmul implementations side by side on this backend (model/gmm.py).

Usage: python bench/gmm.py [--reps 5] [--impls ragged,tiled,batched,blocked] [--dtype float32]
                           [--shapes M,D,F,E;M,D,F,E...]

Rows M are routed to E experts in groups of random sizes; each implementation computes the
forward [M, D] x [E, D, F] (float32 results; err: its largest difference from the first
implementation's, relative to that one's largest entry) and its gradient. The `flat` column
is one plain [M, D] x [D, F] matmul: the FLOPs the routed rows really need, at this
backend's matmul speed.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from model.gmm import grouped_matmul  # noqa: E402

SHAPES = [(1024, 256, 256, 8), (2048, 512, 256, 8), (2048, 512, 256, 32), (4096, 512, 256, 32), (2048, 512, 256, 128)]


def timed(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--impls", default="ragged,tiled,batched,blocked")
    ap.add_argument("--dtype", default="float32", help="of the rows and the matrices (bfloat16 on GPU / TPU)")
    ap.add_argument("--shapes", help="'M,D,F,E;...' instead of the CPU-sized defaults")
    args = ap.parse_args()
    impls = args.impls.split(",")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")] if args.shapes else SHAPES
    dtype = jnp.dtype(args.dtype)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {dtype}; ms per call (forward / forward+grad)\n")
    print("| M x D -> F, E | flat matmul | " + " | ".join(impls) + " | " + " | ".join(f"{i} / flat" for i in impls) + " |")
    print("|---|---|" + "---|" * 2 * len(impls))
    for m, d, f, e in shapes:
        kx, kw, ks = jax.random.split(jax.random.key(0), 3)
        x, w = jax.random.normal(kx, (m, d), dtype), jax.random.normal(kw, (e, d, f), dtype)
        sizes = jnp.bincount(jax.random.randint(ks, (m,), 0, e), length=e).astype(jnp.int32)
        flat = timed(jax.jit(lambda a, b: a @ b), x, w[0], reps=args.reps)
        cells, ratios, ref = [], [], None
        for impl in impls:
            fwd = jax.jit(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, impl, jnp.float32))
            loss = lambda a, b, s, impl=impl: jnp.sum(grouped_matmul(a, b, s, impl, jnp.float32) ** 2)  # noqa: E731
            grad = jax.jit(jax.grad(loss, (0, 1)))
            try:
                tf, tg = timed(fwd, x, w, sizes, reps=args.reps), timed(grad, x, w, sizes, reps=args.reps)
            except Exception as exc:  # noqa: BLE001 (a kernel that does not build here: say so, go on)
                print(f"{impl} at {m} x {d} -> {f}, E={e}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                cells.append("failed")
                ratios.append("-")
                continue
            y = fwd(x, w, sizes)
            ref = y if ref is None else ref  # the first implementation's output: each one's error
            err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
            cells.append(f"{tf:.2f} / {tg:.2f}" + (f" (err {err:.1e})" if impl != impls[0] else ""))
            ratios.append(f"{tf / flat:.1f}x")
        print(f"| {m} x {d} -> {f}, E={e} | {flat:.2f} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
