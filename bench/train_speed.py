"""Training throughput: our jitted train step against HF transformers' PyTorch DeepSeek-V4.

Usage: python bench/train_speed.py [--steps N] [--warmup W] [--batch B] [--seq S]
                                   [--presets tiny,small] [--shape] [--torch-threads T] [--devices 8|1]

Per preset, both frameworks train the same architecture (MTP off: HF has no MTP block) in
float32 on the same random token batch:
  ours   the real step of train/step.py (Muon + AdamW from train/optim.py, CE + balance +
         indexer-KL loss, routing-bias update, donated state, pinned shardings) on a mesh
         fsdp=8 over 8 emulated CPU devices, and on a mesh of 1 device;
  torch  transformers.DeepseekV4ForCausalLM (eager attention and experts, train mode),
         torch.optim.AdamW, loss = model(input_ids, labels=input_ids).loss, balanced hash table.
--shape adds the shape of issue 11's measurement: `small` with dim 256, 4 layers [window, CSA 4,
HCA 16, CSA 4], 8 experts top-2, batch 2 x 256 (1 device only: 2 sequences do not split 8 ways).
Each runs W untimed warm-up steps, then N rounds time one step of every runner in turn (the
median of each runner's N steps): all of them meet the same machine load. The
parameter counts of both models are asserted equal first. MFU uses
model.flops_per_token(cfg, S)["train"] against the machine's measured matmul rate.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if __name__ == "__main__":  # the block cache and glibc's huge pages (train/host.py), before JAX
    from train.host import tune_malloc

    tune_malloc()

import argparse
import resource
import time

# --devices (read before JAX starts): 8 emulated devices for the fsdp=8 rows, or 1. A process
# that emulates 8 devices runs a 1-device program ~20% slower (measured on the dim-256 shape:
# 379 vs 309 ms), so `--devices 1` gives the 1-device rows a process of their own.
DEVICES = int(sys.argv[sys.argv.index("--devices") + 1]) if "--devices" in sys.argv else 8
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from model import flops_per_token, param_counts  # noqa: E402
from model.export import hf_config  # noqa: E402
from model.moe import balanced_hash_table  # noqa: E402
from parallel import MeshConfig, Rules, make_mesh, sharded  # noqa: E402
from train.config import load_run_config  # noqa: E402
from train.host import block_cache_preloaded  # noqa: E402
from train.setup import setup  # noqa: E402

SHAPE = ("shape", "small", ["model.dim=256", "model.n_layers=4", "model.compress_ratios=[0,4,16,4]",
                            "model.n_routed_experts=8", "model.n_activated_experts=2"], 2, 256)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of this machine: the best of `reps` float32 [n, n] x [n, n] products jitted on one
    device (XLA:CPU spreads one matmul over every core)."""
    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), jax.devices()[0])
    mm = jax.jit(lambda a: a @ a)
    mm(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def hf_config_dict(cfg) -> dict:
    """HF DeepSeek-V4 config.json content for a ModelConfig (model.export's), token ids added."""
    return {**hf_config(cfg), "num_nextn_predict_layers": cfg.n_mtp_layers, "bos_token_id": 0, "eos_token_id": 1}


def interleaved(runners: dict, warmup: int, steps: int) -> dict:
    """{name: (median seconds per step, mean page faults, mean kernel seconds per step)} of each
    runner {name: (step, sync)}: `warmup` untimed calls of each (our compile), then `steps`
    rounds that time one synchronised step of every runner in turn, so that all of them meet the
    same machine load (torch's threads on a shared 2-core machine give outlier steps, and a busy
    minute would otherwise land on one side only). Page faults: the process's minor faults
    during the step (fresh pages zero-filled by the kernel; see train/host.py); kernel time: the
    process's system CPU time during the step (zeroing those pages, compacting memory for huge
    ones)."""
    for step, sync in runners.values():
        for _ in range(warmup):
            step()
        sync()
    times, faults, kernel = {name: [] for name in runners}, dict.fromkeys(runners, 0), dict.fromkeys(runners, 0.0)
    for _ in range(steps):
        for name, (step, sync) in runners.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[name] += r1.ru_minflt - r0.ru_minflt
            kernel[name] += r1.ru_stime - r0.ru_stime
    return {name: (float(np.median(t)), faults[name] / steps, kernel[name] / steps) for name, t in times.items()}


def bench_config(preset: str, model_overrides, batch: int, seq: int, optim: str, steps: int):
    """The run config both frameworks' rows use: `preset` (plus overrides) from configs/tiny.yaml
    with MTP off (HF has none), float32 everywhere; its mesh fields stay 1 (compile_ours builds
    the mesh over the devices it is given)."""
    # model.preset= resets the model section: keep configs/tiny.yaml's scan_unroll
    unroll = load_run_config(os.path.join(ROOT, "configs/tiny.yaml")).model.scan_unroll
    return load_run_config(os.path.join(ROOT, "configs/tiny.yaml"), [
        f"model.preset={preset}", *model_overrides, "model.n_mtp_layers=0", "model.dtype=float32",
        f"model.scan_unroll={unroll}", "model.param_dtype=float32", "mesh.data=1", "mesh.expert=1",
        "mesh.tensor=1", "mesh.fsdp=1", f"data.global_batch={batch}", f"data.seq_len={seq}",
        f"train.steps={steps}", f"optim.name={optim}"])


def compile_ours(run_cfg, devices, tokens):
    """(compiled step, state, batch): our train step compiled ahead of time on a data-parallel
    mesh over `devices`, as python -m train runs it (under the mesh's context, so that several
    meshes' steps can run in turn), with its first state and the token batch placed."""
    cfg = run_cfg.model
    # FSDP: parameters and optimiser state split 8 ways (a data=8 copy of `small` per emulated
    # device does not fit this machine's 24 GB); the batch is split over fsdp as over data
    mesh = make_mesh(MeshConfig(data=1, fsdp=len(devices)), cfg, devices=devices, global_batch=tokens.shape[0])
    rules = Rules.of_run(run_cfg)
    state, shardings, step_fn = setup(run_cfg, mesh, rules)
    ones = np.ones(tokens[:, 1:].shape, np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
             "loss_mask": ones.astype(np.float32)}
    batch = jax.device_put(local, NamedSharding(mesh, rules.spec(("batch", None))))
    with sharded(mesh, rules, run_cfg.train.moe_transport, run_cfg.train.capacity_factor):
        compiled = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None)).lower(state, batch).compile()
    return compiled, state, batch


def ours(run_cfg, devices, tokens):
    """(step, sync, check) of our compiled step (compile_ours), its state donated from step to step."""
    jstep, state, batch = compile_ours(run_cfg, devices, tokens)
    holder = {"state": state, "metrics": None}

    def one():
        holder["state"], holder["metrics"] = jstep(holder["state"], batch)

    def check():
        loss = float(holder["metrics"]["loss"])
        assert np.isfinite(loss), f"our loss is not finite: {loss}"

    return one, lambda: jax.block_until_ready(holder), check


def build_torch(cfg):
    """HF DeepseekV4ForCausalLM for `cfg` in float32, train mode, eager, balanced hash tables."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    d = hf_config_dict(cfg)
    for key in ("model_type", "architectures"):
        d.pop(key)
    torch.manual_seed(0)
    net = DeepseekV4ForCausalLM._from_config(DeepseekV4Config(**d), dtype=torch.float32,
                                             attn_implementation="eager", experts_implementation="eager")
    net = net.to(torch.float32).train()
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("tid2eid"):  # model.layers.{i}.mlp.gate.tid2eid; all zeros at init
                layer = int(name.split(".")[2])
                table = balanced_hash_table(cfg.vocab_size, cfg.n_routed_experts,
                                            cfg.n_activated_experts, cfg.hash_seed + layer)
                buf.copy_(torch.from_numpy(table).to(buf.dtype))
    return net


def hf(net, tokens):
    """(step, sync, check) of HF's eager training step: AdamW on its CE loss."""
    import torch

    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    losses = []

    def one():  # HF shifts the labels itself: S - 1 targets per row
        loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    def check():
        assert torch.isfinite(losses[-1]), f"torch loss is not finite: {losses[-1]}"

    return one, lambda: None, check


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--optim", default="muon", choices=("muon", "adamw"), help="our optimiser (HF always uses AdamW)")
    ap.add_argument("--batch", type=int, default=8, help="global batch; a multiple of 8 (mesh fsdp=8)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--shape", action="store_true", help="add the dim-256 4-layer shape at batch 2 x 256")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--devices", type=int, default=8, choices=(1, 8),
                    help="emulated devices: 8 times fsdp=8 and 1 device; 1 times 1 device in a 1-device process")
    args = ap.parse_args()
    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
    b, s = args.batch, args.seq
    peak = matmul_peak()
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"jax {jax.__version__} ({len(jax.devices())} emulated {jax.devices()[0].platform} devices), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPU cores")
    rows = []
    cases = [(name, name, [], b, s) for name in args.presets.split(",") if name] + ([SHAPE] if args.shape else [])
    for name, preset, model_overrides, b, s in cases:
        run_cfg = bench_config(preset, model_overrides, b, s, args.optim, max(args.warmup + args.steps, 20))
        cfg = run_cfg.model
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, s + 1), dtype=np.int32)
        net = build_torch(cfg)
        ours_n, torch_n = param_counts(cfg)["total"], sum(p.numel() for p in net.parameters())
        assert ours_n == torch_n, f"{name}: parameter counts differ: ours {ours_n:,} vs HF {torch_n:,}"
        print(f"  {name}: {ours_n:,} parameters in both; timing ...", flush=True)
        runners = {}
        if b % 8 == 0 and DEVICES == 8:
            runners["ours, mesh fsdp=8"] = ours(run_cfg, jax.devices(), tokens)
        runners[f"ours, 1 device{' (1-device process)' if DEVICES == 1 else ''}"] = ours(run_cfg, jax.devices()[:1], tokens)
        runners["HF torch eager"] = hf(net, tokens)
        times = interleaved({k: r[:2] for k, r in runners.items()}, args.warmup, args.steps)
        for _, _, check in runners.values():
            check()
        del runners
        del net
        flops = flops_per_token(cfg, s)["train"]
        for fw, (sec, flt, sys_s) in times.items():
            rows.append((name, fw, ours_n, b * s, sec, b * s / sec, b * s / sec * flops / peak,
                         times["HF torch eager"][0] / sec if fw.startswith("ours") else None, flt, sys_s))
    print(f"\nTraining step, random tokens, {args.warmup} warm-up + {args.steps} timed steps (median), "
          "float32 everywhere. MTP disabled in both frameworks (n_mtp_layers=0; HF has no MTP block).")
    print(f"Ours: {'Muon + AdamW' if args.optim == 'muon' else 'AdamW'}, CE + balance + indexer-KL loss, routing-bias update (the real step). "
          "HF: AdamW, CE only, eager attention and experts.")
    print(f"MFU = tokens/s x model.flops_per_token(cfg, S)['train'] / {peak:.2e} FLOP/s (this machine's "
          "float32 matmul rate, measured now: a jitted 2048 x 2048 product, best of 5).")
    cache = "on" if block_cache_preloaded() else "off"
    print("Page faults and kernel ms: the process's minor faults and system CPU time per step, mean "
          f"(GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}; block cache {cache}, train/host.py: "
          "both frameworks' allocations in this process).\n")
    print("| preset | framework | params | tokens/step | step ms | tokens/s | MFU | ours / torch | page faults | kernel ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, fw, n, tokens, sec, tps, mfu, ratio, flt, sys_s in rows:
        print(f"| {name} | {fw} | {n / 1e6:.2f}M | {tokens} | {1000 * sec:.1f} | {tps:,.0f} | "
              f"{100 * mfu:.2f}% | {f'{ratio:.2f}x' if ratio else '-'} | {flt:,.0f} | {1000 * sys_s:.0f} |")


if __name__ == "__main__":
    main()
