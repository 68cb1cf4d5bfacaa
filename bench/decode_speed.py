"""Generation speed on the CPU: our prefill + decode (infer/) against HF transformers' `generate`.

Usage: python bench/decode_speed.py [--presets tiny,small] [--batches 1,8] [--prompt 64]
                                    [--new 32] [--repeats 1] [--torch-threads T]

Per preset and batch, both frameworks run the same random model (float32, MTP off: HF has none;
our weights exported with model.export's HF config and names) greedily on the same random
prompts of --prompt tokens, --new new tokens, no stop token:
  ours   infer.sample.generate on one device (float cache, prefill in chunks, one jitted decode
         step per token, the host reading each token back), on the unscanned model (as the CLI);
  HF     DeepseekV4ForCausalLM.generate (eager attention and experts, its CSA / HCA caches).
Prefill time = a run with 1 new token; decode time = a run with --new tokens minus that, over
--new - 1 tokens per sequence. Each number is the best of --repeats runs after one untimed
warm-up run (our compile). Tokens/s count every sequence of the batch. `same` says whether the
two frameworks produced the same tokens (near-tied logits of a random model may differ).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # glibc's malloc on transparent huge pages (train/host.py), before JAX
    from train.host import tune_malloc

    tune_malloc()

import argparse
import datetime
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from infer.layout import unscan  # noqa: E402
from infer.sample import generate  # noqa: E402
from model import build, preset  # noqa: E402
from model.export import hf_config  # noqa: E402
from model.hf import hf_tensors  # noqa: E402


def best(fn, repeats: int) -> tuple[float, object]:
    """(fastest wall time of `repeats` calls after one untimed call, the last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def hf_model(model):
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    d = hf_config(model.cfg)
    d.pop("model_type"), d.pop("architectures")
    net = DeepseekV4ForCausalLM._from_config(DeepseekV4Config(**d), dtype=torch.float32,
                                             attn_implementation="eager", experts_implementation="eager")
    net.load_state_dict({k: torch.tensor(v) for k, v in hf_tensors(model).items()})
    return net.to(torch.float32).eval()


def measure(name: str, batch: int, args) -> dict:
    import torch

    cfg = preset(name, n_mtp_layers=0, dtype="float32")
    model = unscan(build(cfg, rngs=nnx.Rngs(0)))        # as the CLI: layers sliced out of stacks once
    prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt))
    n, max_len = args.new, args.prompt + args.new
    ours = lambda k: generate(model, prompts.tolist(), k, max_len=max_len)  # noqa: E731
    t_pre, _ = best(lambda: ours(1), args.repeats)
    t_all, got = best(lambda: ours(n), args.repeats)
    net, ids = hf_model(model), torch.tensor(prompts)
    hf = lambda k: net.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,  # noqa: E731
                                eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        h_pre, _ = best(lambda: hf(1), args.repeats)
        h_all, want = best(lambda: hf(n), args.repeats)
    same = [list(map(int, row[args.prompt:])) for row in want] == got
    rate = lambda tokens, s: tokens / max(s, 1e-9)  # noqa: E731
    return {"preset": name, "batch": batch, "same": same,
            "ours_prefill": rate(batch * args.prompt, t_pre), "hf_prefill": rate(batch * args.prompt, h_pre),
            "ours_decode": rate(batch * (n - 1), t_all - t_pre),
            "hf_decode": rate(batch * (n - 1), h_all - h_pre),
            "ours_ms": 1e3 * (t_all - t_pre) / (n - 1), "hf_ms": 1e3 * (h_all - h_pre) / (n - 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="new tokens per sequence")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
    print(f"# {datetime.date.today()}, jax {jax.__version__} ({jax.devices()[0].platform}, 1 device), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, {os.cpu_count()} CPU cores; greedy, float32, prompt {args.prompt} "
          f"tokens, {args.new} new tokens\n", flush=True)
    print("| preset | batch | prefill tok/s ours | HF | ours / HF | decode tok/s ours | HF | ours / HF "
          "| decode ms/step ours | HF | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.presets.split(","):
        for batch in map(int, args.batches.split(",")):
            r = measure(name, batch, args)
            print(f"| {r['preset']} | {r['batch']} | {r['ours_prefill']:,.0f} | {r['hf_prefill']:,.0f} "
                  f"| {r['ours_prefill'] / r['hf_prefill']:.1f}x "
                  f"| {r['ours_decode']:,.0f} | {r['hf_decode']:,.0f} "
                  f"| {r['ours_decode'] / r['hf_decode']:.1f}x | {r['ours_ms']:.1f} | {r['hf_ms']:.1f} "
                  f"| {'yes' if r['same'] else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
