"""Grouped matmul implementations side by side on this backend (model/gmm.py).

Usage: python bench/gmm.py [--reps 5]

Rows M are routed to E experts in groups of random sizes; each implementation computes the
forward [M, D] x [E, D, F] and its gradient. The `flat` column is one plain [M, D] x [D, F]
matmul: the FLOPs the routed rows really need, at this backend's matmul speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    ap.add_argument("--impls", default="ragged,tiled")
    args = ap.parse_args()
    impls = args.impls.split(",")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, float32; ms per call (forward / forward+grad)\n")
    print("| M x D -> F, E | flat matmul | " + " | ".join(impls) + " | " + " | ".join(f"{i} / flat" for i in impls) + " |")
    print("|---|---|" + "---|" * 2 * len(impls))
    for m, d, f, e in SHAPES:
        kx, kw, ks = jax.random.split(jax.random.key(0), 3)
        x, w = jax.random.normal(kx, (m, d)), jax.random.normal(kw, (e, d, f))
        sizes = jnp.bincount(jax.random.randint(ks, (m,), 0, e), length=e).astype(jnp.int32)
        flat = timed(jax.jit(lambda a, b: a @ b), x, w[0], reps=args.reps)
        cells, ratios = [], []
        for impl in impls:
            fwd = jax.jit(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, impl))
            grad = jax.jit(jax.grad(lambda a, b, s, impl=impl: jnp.sum(grouped_matmul(a, b, s, impl) ** 2), (0, 1)))
            tf, tg = timed(fwd, x, w, sizes, reps=args.reps), timed(grad, x, w, sizes, reps=args.reps)
            cells.append(f"{tf:.2f} / {tg:.2f}")
            ratios.append(f"{tf / flat:.1f}x")
        print(f"| {m} x {d} -> {f}, E={e} | {flat:.2f} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
