"""`python -m infer`: generate text from prompts with a run configuration's model.

    python -m infer --config configs/tiny.yaml --prompt "To be" [--prompt ...] [--run RUN_DIR]
                    [--batch-file FILE [--batch-size 16]] [--max-new-tokens 64] [--max-len N]
                    [--temperature 0.8 --top-k 40 --top-p 0.95 --seed 0] [--speculative]
                    [--fp8] [--chunk N] [--page-tokens N] [model.dtype=float32 ...]

Without --run the model and tokenizer come from --config and the weights are random (a
smoke test). With --run RUN_DIR (a training run): its own config.yaml (plus the overrides) gives
the model and tokenizer, and the newest verified checkpoint is restored onto one device
(train.setup.restore_run, as model.export does).
One --prompt is streamed: its text is printed as the tokens are produced. Several --prompt are
decoded as one batch and printed prompt + completion each. --batch-file reads one prompt per
line (blank lines skipped) or, for a .jsonl file, one JSON object with a "prompt" string per
line; they are decoded in batches of --batch-size and printed as JSON lines {"prompt",
"completion"}. --speculative: greedy decoding with the MTP block's drafts (same text); the
acceptance rate goes to stderr.
The context is --max-len tokens (default: longest prompt + --max-new-tokens); a sequence stops
when it fills it. Bad input (an empty prompt, one that fills the context, a context past the
model's maximum position, token ids outside the vocabulary, a run without a checkpoint, a bad
value) prints `error: ...` on one stderr line and exits with status 2, before any model is built.
This entry point is the one place infer/ reads train/: the checkpoint and tokenizer formats
are the trainer's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m infer", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml", help="run configuration YAML")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    ap.add_argument("--batch-file", help="prompts, one per line (or JSONL with a 'prompt' field)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences decoded together (--batch-file)")
    ap.add_argument("--run", "--checkpoint", dest="run",
                    help="a training run's directory (log.run_dir): its newest good checkpoint")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-len", type=int, help="context tokens (default: longest prompt + max new tokens)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speculative", action="store_true", help="greedy with MTP drafts (same output)")
    ap.add_argument("--fp8", action="store_true", help="MODEL1 FP8 KV cache (head_dim 512 models)")
    ap.add_argument("--hold-quantized", action="store_true",
                    help="hold the fp8 projections and quantised routed experts as codes + scales in memory "
                         "(model/storage.py; same tokens, needs model.quant_matmul / quant_experts on)")
    ap.add_argument("--chunk", type=int, help="prefill chunk tokens (a multiple of every ratio)")
    ap.add_argument("--page-tokens", type=int, help="KV-cache page size in tokens")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.dtype=float32")
    return ap.parse_intermixed_args(argv)    # overrides may come before or after the options


def read_batch_file(path) -> list[str]:
    """Prompts of a text file (one a line, blank lines skipped) or a .jsonl file."""
    from model.config import ConfigError

    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not str(path).endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--batch-file {path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"--batch-file {path}, line {n}: expected an object with a \"prompt\" string")
        prompts.append(row["prompt"])
    return prompts


def run_config(args):
    """The RunConfig, checked cheaply: with --run, its config.yaml and a checkpoint step exist."""
    from train.config import load_run_config

    if not args.run:
        return load_run_config(args.config, args.overrides)
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--run {run}: no config.yaml; give the log.run_dir of a training run")
    cfg = load_run_config(str(run / "config.yaml"), args.overrides)
    where = cfg.checkpoint.dir or str(run / "checkpoints")
    steps = Path(where).is_dir() and any(p.name.isdigit() for p in Path(where).iterdir())
    if "://" not in where and not steps:
        raise FileNotFoundError(f"--run {run}: the run has no checkpoint yet (no step in {where}); "
                                "train it first or give another run")
    return cfg


class Stream:
    """on_token callback printing one sequence's text as it grows (an incomplete UTF-8
    character waits for its remaining bytes)."""

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown = tok, out, [], ""

    def __call__(self, slot, token, final=False):
        if token is not None:
            self.ids.append(token)
        text = self.tok.decode(self.ids)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.shown) or text == self.shown:
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from model.config import ConfigError
    from train.checkpoint import CheckpointError
    from train.distributed import rare_full_gc

    rare_full_gc()
    try:
        return _main(args)
    except (ConfigError, CheckpointError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


def _main(args) -> int:
    from flax import nnx

    from model import build
    from model.config import ConfigError
    from train.tokenizer import make_tokenizer

    from .layout import unscan
    from .sample import check_inputs, generate

    if bool(args.prompt) == bool(args.batch_file):
        raise ConfigError("prompts: give --prompt (repeatable) or --batch-file, not both or neither")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    cfg = run_config(args)
    tok = make_tokenizer(cfg.data.tokenizer)
    texts = read_batch_file(args.batch_file) if args.batch_file else args.prompt
    prompts = [tok.encode(p) for p in texts]
    opts = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                speculative=args.speculative)
    check_inputs(cfg.model, prompts, args.max_new_tokens, args.max_len, **opts)   # before any build
    if args.hold_quantized:
        from model.storage import check_holdable

        check_holdable(cfg.model)
    if args.run:
        from train.setup import restore_run

        model, cfg, step = restore_run(args.run, args.overrides)
        where = f"checkpoint step {step} of {args.run}"
    else:
        model, where = build(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), "random weights"
    model = unscan(model)                              # once, not in every generate call
    print(f"# {cfg.model.n_layers}-layer model, {where}", file=sys.stderr)
    if args.hold_quantized:
        from model.storage import hold_quantized

        held = hold_quantized(model)
        print(f"# weights held quantised: {(held['values'] + held['scales']) / 2**20:.2f} MiB of codes and "
              f"scales, {held['other'] / 2**20:.2f} MiB other", file=sys.stderr)
    stats, total = {}, {"drafted": 0, "accepted": 0, "steps": 0}
    kw = dict(opts, seed=args.seed, stop_tokens=[tok.eos_id], fp8=args.fp8, chunk=args.chunk,
              page_tokens=args.page_tokens, max_len=args.max_len, stats=stats)
    if len(prompts) == 1 and not args.batch_file:                  # streamed
        print(texts[0], end="", flush=True)
        stream = Stream(tok, sys.stdout)
        generate(model, prompts, args.max_new_tokens, on_token=stream, **kw)
        stream(0, None, final=True)
        print()
        _add(total, stats)
    else:
        size = args.batch_size if args.batch_file else len(prompts)
        for start in range(0, len(prompts), size):
            outs = generate(model, prompts[start:start + size], args.max_new_tokens, **kw)
            _add(total, stats)
            for p, o in zip(texts[start:start + size], outs):
                text = tok.decode(o)
                print(json.dumps({"prompt": p, "completion": text}) if args.batch_file else p + text, flush=True)
    if args.speculative:
        rate = total["accepted"] / max(total["drafted"], 1)
        print(f"# speculative: {total['accepted']} of {total['drafted']} MTP drafts accepted ({rate:.1%}), "
              f"{total['steps']} main-model steps", file=sys.stderr)
    return 0


def _add(total, stats):
    for k in total:
        total[k] += stats.get(k, 0)


if __name__ == "__main__":
    from train.host import tune_malloc

    tune_malloc()  # the block cache and glibc huge pages for host allocations (train/host.py)
    sys.exit(main())
