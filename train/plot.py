"""`python -m train.plot RUN_DIR [--out PATH]`: loss curves of a run as a PNG.

Reads RUN_DIR/metrics.jsonl (written by the training loop) and draws the total loss and each
loss term against the step, the held-out loss (`eval_loss` records, log.eval_every) as
markers, plus the learning rate. Needs matplotlib (`pip install
'deepflax[plot]'`); training itself does not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

TERMS = ("loss", "ce", "mtp", "kl")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(run_dir: str, out: str | None = None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("train.plot needs matplotlib: pip install 'deepflax[plot]'") from e
    everything = read_metrics(run_dir)
    records = [r for r in everything if "loss" in r]  # training steps
    evals = [r for r in everything if "eval_loss" in r]  # their own records (train/hooks.py)
    if not records:
        raise FileNotFoundError(f"{run_dir}: metrics.jsonl has no training records yet")
    steps = [r["step"] for r in records]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for term in TERMS:
        if term in records[0]:
            ax.plot(steps, [r[term] for r in records], label=term)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", color="black",
                label="eval (held-out ce)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", 0.0) for r in records], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "loss.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = ap.parse_args(argv)
    try:
        print(plot(args.run_dir, args.out))
    except (FileNotFoundError, ImportError) as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
