"""Per-device bytes of one training step, estimated without devices or FLOPs.

- The train state (parameters, routing tables, optimiser state, gradients): the abstract model
  and optimiser (jax.eval_shape) laid out by the sharding rules on an abstract mesh of the
  topology's size: exact, the layout `python -m train` creates (plan/state.py).
- Activations: the residuals autodiff keeps for the backward pass, read off `jax.vjp` of the
  real loss traced abstractly (no FLOPs, no memory) at 1 and 2 sequences, so the policy of
  `model.remat` is applied by JAX itself, with the MoE's grouped matmul standing in for the
  target's kernel (plan/activations.py, traced_impl). Per-sequence residuals scale with the sequences each
  device holds; the rest (weights cast to the compute dtype, kept for the backward) is counted
  sharded like the parameters. A rematerialised block recomputes its forward during the
  backward: one block's residuals (the remat-none residuals over the layer count) are added as
  the working set. Activations sharded over `tensor` are counted whole (an upper bound).
- The loss head's float32 logits of one vocabulary slice (model.head_chunks; split over
  `tensor`) for the device's sequences, twice: the slice and, in the backward, its gradient
  (train/step.py's head_ce recomputes them slice by slice; they are never residuals). On one
  H200 (bench/gpu_train.py, head_chunks 1) they were 31.6 GiB of the 35.5 the estimate missed.
- The gradients of the embedding and the head, full-size on every device before their
  reduce-scatter (a device's tokens touch every row), twice (the partial and the collective's
  buffer); the head's one vocabulary slice at a time (model.head_chunks): StateLayout.vocab_partials.
- The expert-parallel MoE layer being recomputed and differentiated, which the one-device trace
  above does not have (its routed rows never leave the device and its experts work on the
  routed pairs, not on a receive buffer of capacity_factor x as many rows): `exchange_bytes`.
  The one-device trace's own expert residuals are taken out of the working set then.
- The phases: these rows are not all live at once. libtpu's live ranges (docs/benchmarks.md,
  2026-12-05) show the backward's peak either in the last blocks (MTP, every residual still
  kept, one block recomputed with its MoE backward), or in the layer loop (the gradients and
  the loop's stacked residuals, one block and its MoE), or in the loss head (every residual,
  the head's logits and the vocabulary partials). The temporaries are the largest phase.
- libtpu's copy of the layer loops' carried state: the temporaries libtpu reports exceed the
  buffer assignment it dumps by about the size of the forward layer loops' carried state (their
  stacked residuals and the looped layers' parameters): 0.87-1.09x on nine compiles of
  8 to 61 layers, 2 to 8 mHC streams, Muon and AdamW; no allocation in the dumped program holds
  it (a measured correspondence, not a mechanism). Counted for TPU targets only. For GPU
  targets the temporaries stay the sum of the rows (Memory: what one H200 compile showed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from plan.activations import Activations, local_expert_residuals
from plan.state import looped_layers

FIT_FRACTION = 0.9  # of HBM: what the estimate may use (XLA's temporaries, fragmentation)


@dataclass(frozen=True)
class Memory:
    """Per-device bytes of one training step (the device holding the most). On TPU the
    temporaries are the largest of three phases of the backward, which are never live together
    (the dumped live ranges of libtpu's compiles, docs/benchmarks.md 2026-12-05), plus libtpu's
    copy of the layer loops' carried state:
    - the loss head: every residual, the head's logits of one slice, the vocabulary partials;
    - the last blocks (MTP, unlooped): every residual, one block recomputed, its MoE backward;
    - the layer loop: the gradients, the loop's stacked residuals, one block and its MoE.
    On GPU they are the sum of the rows: one H200 compile (the ~1B-active step, 2026-12-04)
    held them all at once (estimate 3% under the compiled total summed, 32% under by phases);
    no GPU compile has been read for phases."""
    params: float
    rest: float
    grads: float
    opt: float
    batch: float
    saved: float      # activations kept for the backward
    working: float    # one block recomputed during the backward (remat), weight casts
    seqs: float       # sequences per device per micro-batch
    partials: float   # full-size embedding / head gradients before their reduce-scatter
    exchange: float   # the expert-parallel MoE layer's backward: buffers, residuals, cotangents
    logits: float     # the loss head's logits of one vocabulary slice and their gradient
    accumulator: float = 0.0  # the micro-batches' gradient sum (train.micro_batches > 1)
    stacks: float = 0.0       # of `saved`: the layer loops' stacked residuals
    loop_copy: float = 0.0    # libtpu: a second copy of the layer loops' carried state
    platform: str = "tpu"     # of the target: phases on TPU, the sum of the rows elsewhere

    @property
    def arguments(self) -> float:
        """What the step takes in: the train state and the batch."""
        return self.params + self.rest + self.opt + self.batch

    @property
    def phases(self) -> dict[str, float]:
        block = self.working + self.exchange
        return {"loss head": self.accumulator + self.saved + self.logits + self.partials,
                "last blocks": self.accumulator + self.saved + block,
                "layer loop": self.accumulator + self.grads + self.stacks + block}

    @property
    def peak_phase(self) -> str:
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def temporaries(self) -> float:
        """What the step allocates while it runs: on TPU its largest phase and libtpu's copy,
        elsewhere every row."""
        if self.platform != "tpu":
            return (self.grads + self.accumulator + self.saved + self.working + self.exchange + self.logits
                    + self.partials)
        return max(self.phases.values()) + self.loop_copy

    @property
    def total(self) -> float:
        return self.arguments + self.temporaries

    def rows(self, run_cfg) -> list[tuple[str, float]]:
        m = run_cfg.model
        return [(f"parameters ({m.param_dtype})", self.params),
                ("routing biases and hash tables", self.rest),
                (f"optimiser state ({run_cfg.optim.name})", self.opt),
                ("batch (inputs, targets, segments, mask)", self.batch),
                ("gradients", self.grads),
                ("gradient accumulator (micro-batches)", self.accumulator),
                (f"activations kept (remat {m.remat}, {self.seqs:g} seq x {run_cfg.data.seq_len})", self.saved),
                ("  of which the layer loops' stacked residuals", self.stacks),
                ("recompute working set + weight casts", self.working),
                ("expert-parallel MoE layer (exchange, backward)", self.exchange),
                (f"loss head logits (vocab / {m.head_chunks}, + gradient)", self.logits),
                ("embedding / head grads before reduce-scatter", self.partials),
                ("libtpu: copy of the layer loops' carried state", self.loop_copy)]


def estimate(run_cfg, layout, act: Activations, sizes: dict[str, int]) -> Memory:
    from model.layers import dtype_of
    from parallel.mesh import abstract_mesh

    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = run_cfg.train.micro_batches
    seqs = run_cfg.data.global_batch / shards / micro
    mesh = abstract_mesh(sizes)
    state = layout.bytes_per_device(mesh)
    param_share = state["params"] / layout.param_bytes
    batch = 4 * 4 * run_cfg.data.global_batch / shards * run_cfg.data.seq_len
    m = run_cfg.model
    # a block's routed experts are the exchange row's when they sit behind an expert axis
    block = act.block - (act.moe if sizes["expert"] > 1 else 0)
    # a looped block keeps its input stream (remat full); under another policy every residual
    # is counted as the loops' (an upper bound)
    stream = run_cfg.data.seq_len * m.hc_mult * m.dim * dtype_of(m.dtype).itemsize
    stacks = (looped_layers(m) * stream if m.remat == "full" else act.per_seq) * seqs
    copy = stacks + state["looped"] if act.platform == "tpu" else 0
    return Memory(state["params"], state["rest"], state["params"], state["opt"], batch, act.per_seq * seqs,
                  block * seqs + act.fixed * param_share, seqs,
                  layout.vocab_partials(mesh, m.head_chunks),
                  exchange_bytes(run_cfg, sizes["expert"], seqs, sizes["tensor"]),
                  head_logit_bytes(m, seqs * run_cfg.data.seq_len, sizes["tensor"]),
                  accumulator=state["params"] if micro > 1 else 0, stacks=stacks, loop_copy=copy,
                  platform=act.platform)


def head_logit_bytes(cfg, tokens: float, tp: int = 1) -> float:
    """Bytes of the loss head's float32 logits of one vocabulary slice for `tokens` tokens,
    vocabulary split over `tp`, and of their gradient: train/step.py's head_ce makes them slice
    by slice, forward and backward, and keeps none."""
    return 2 * 4 * tokens * math.ceil(cfg.vocab_size / cfg.head_chunks / tp)


def exchange_bytes(run_cfg, ep: int, seqs: float, tp: int = 1) -> int:
    """Bytes of one MoE layer's expert-parallel backward on a device holding `seqs` sequences
    (see the module's docstring), as libtpu's live ranges show them at the peak of the last
    blocks' backward (docs/benchmarks.md, 2026-12-05): the local experts' residuals at the
    receive buffer's rows (capacity_factor x the balanced load, or every sender's pairs when
    dropless: parallel.expert.ragged_capacity; expert hidden units split over `tp`), the
    received rows' cotangent [rows, dim] in the compute dtype, and the two float32 [rows,
    hidden] upcasts SwiGLU's backward makes. 0 without an expert axis."""
    from model.layers import dtype_of
    from parallel.expert import ragged_capacity

    if ep == 1:
        return 0
    m = run_cfg.model
    pairs = math.ceil(seqs * run_cfg.data.seq_len * m.n_activated_experts)
    rows = ragged_capacity(pairs, ep, run_cfg.train.capacity_factor)
    local, hidden = m.n_routed_experts // ep, m.moe_inter_dim // tp
    cotangent = rows * m.dim * dtype_of(m.dtype).itemsize
    upcasts = 2 * rows * hidden * 4
    return local_expert_residuals(m, local, hidden, rows) + cotangent + upcasts
