"""`python -m infer`: generate text from a prompt with a run configuration's model.

    python -m infer --config configs/tiny.yaml --prompt "To be" [--run RUN_DIR]
                    [--max-new-tokens 64] [--temperature 0.8 --top-k 40 --top-p 0.95 --seed 0]
                    [--fp8] [model.dtype=float32 ...]

Without --run the model and tokenizer come from --config and the weights are random (a
smoke test). With --run RUN_DIR (a training run): its own config.yaml (plus the overrides) gives
the model and tokenizer, and the newest verified checkpoint is restored onto one device
(train.main.restore_run, as model.export does).
This entry point is the one place infer/ reads train/: the checkpoint and tokenizer formats
are the trainer's.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m infer", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml", help="run configuration YAML")
    ap.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    ap.add_argument("--run", "--checkpoint", dest="run",
                    help="a training run's directory (log.run_dir): its newest good checkpoint")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp8", action="store_true", help="MODEL1 FP8 KV cache (head_dim 512 models)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.dtype=float32")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from flax import nnx

    from model import build
    from model.config import ConfigError
    from train.checkpoint import CheckpointError
    from train.config import load_run_config
    from train.main import restore_run
    from train.tokenizer import make_tokenizer

    from .sample import generate

    try:
        if args.run:  # the run's own config (model, tokenizer), with the overrides
            model, cfg, step = restore_run(args.run, args.overrides)
            where = f"checkpoint step {step} of {args.run}"
        else:
            cfg = load_run_config(args.config, args.overrides)
            model, where = build(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), "random weights"
        tok = make_tokenizer(cfg.data.tokenizer)
        prompts = [tok.encode(p) for p in args.prompt]
        outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_tokens=[tok.eos_id], fp8=args.fp8)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {cfg.model.n_layers}-layer model, {where}", file=sys.stderr)
    for p, o in zip(args.prompt, outs):
        print(p + tok.decode(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
