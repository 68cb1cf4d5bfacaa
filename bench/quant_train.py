"""Quantisation-aware training against float training: the same `tiny` run twice, side by side.

Usage: python bench/quant_train.py [--steps N] [--out DIR] [overrides ...]

Runs `python -m train --config configs/tiny.yaml` three times with the same data, seed and
steps: float (every model.quant_* switch off), quantised (fp8 projections, fp4 routed experts,
fp8 KV, fp4 indexer, as DeepSeek trains; blocks scaled down to tiny's widths: matmul 16,
fp4 32, KV 8), and the same with the fp8 projections multiplied natively
(model.quant_matmul_impl=native: e4m3 operands in the matmul). Prints the final loss of each
(mean of the last 3 logged values), the ratio to float (target: within 3%) and the median
tokens/s after the first logged window (what the simulation and the native form cost on this
backend). Extra `key=value` overrides apply to every run.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if __name__ == "__main__":  # glibc's malloc on transparent huge pages (train/host.py), before JAX
    from train.host import tune_malloc

    tune_malloc()

import argparse
import json
import statistics
import subprocess
import tempfile

QUANT = ["model.quant_matmul=fp8", "model.quant_experts=fp4", "model.quant_kv=fp8",
         "model.quant_indexer=fp4", "model.quant_block=16", "model.quant_fp4_block=32",
         "model.quant_kv_block=8"]


def run(name: str, steps: int, out: str, overrides: list[str]) -> dict:
    run_dir = os.path.join(out, name)
    cmd = [sys.executable, "-m", "train", "--config", "configs/tiny.yaml", f"train.steps={steps}",
           f"log.run_dir={run_dir}", "log.tensorboard=false", "checkpoint.interval_steps=100000",
           *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"loss"' in line]
    return {"loss": statistics.mean(r["loss"] for r in records[-3:]),
            "tok_s": statistics.median(r["tokens_per_s"] for r in records[1:]) if len(records) > 1 else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="run directories (default: a temporary one)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="quant-bench-")
    base = run("float", args.steps, out, args.overrides)
    qat = run("quantised", args.steps, out, args.overrides + QUANT)
    native = run("native", args.steps, out, args.overrides + QUANT + ["model.quant_matmul_impl=native"])
    print(f"\n| tiny, {args.steps} steps | final loss | / float | tokens/s | / float |")
    print("|---|---|---|---|---|")
    for name, r in (("float", base), ("fp8 matmul + fp4 experts + fp8 KV + fp4 indexer (simulated)", qat),
                    ("the same, fp8 matmuls native", native)):
        print(f"| {name} | {r['loss']:.4f} | {r['loss'] / base['loss']:.4f} | {r['tok_s']:,.0f} | "
              f"{r['tok_s'] / base['tok_s']:.2f} |")


if __name__ == "__main__":
    main()
