"""Expert parallelism: tokens travel to the devices holding their experts and back (shard_map).

Legend: n local tokens, k experts per token, P = n*k (token, slot) pairs, D model dim,
F expert hidden (local share), E experts, El = E / ep local experts, ep expert-parallel size,
C capacity per (source, destination) pair.

The router runs outside (per token, wherever the token lives). Inside `jax.shard_map`, each
device sends every (token, slot) pair to the device owning its expert, runs its local experts
with grouped matmuls (model/gmm.py, `model.moe_impl`), sends the results back and adds them, weighted by
the gate, into the token's output. Expert hidden units may be sharded over `tensor`: each
tensor device computes its share of the hidden units and one psum over `tensor` (shared with
the shared expert, computed in the same place) finishes the down projection. FSDP shards of the
expert weights are all-gathered inside.

Without an expert axis (ep = 1) the pairs stay where they are. Otherwise two transports, one
switch (`transport`):
- "capacity": fixed-size buffers and `all_to_all`; runs everywhere (XLA:CPU included). Each
  (source, destination) pair gets C = ceil(capacity_factor * P / ep) slots; pairs beyond it are
  dropped (output 0 for that slot) and counted. capacity_factor=None is dropless: C = P, the
  worst case, and the result is exact.
- "ragged": `jax.lax.ragged_all_to_all` sends exactly the pairs routed (TPU / GPU; XLA:CPU does
  not implement it) into a receive buffer of every sender's pairs (dropless: ep x P rows, the
  worst case) or of capacity_factor x P rows, where chunks that do not fit are cut, in sender
  order, and counted as dropped. "auto" picks ragged on TPU / GPU and capacity on CPU.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.config import ConfigError
from model.gmm import choose_impl, grouped_matmul, grouped_matmuls
from model.moe import swiglu

from .mesh import platform_of
from .rules import Rules

F32 = jnp.float32
TRANSPORTS = ("auto", "capacity", "ragged")


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def choose_transport(transport: str, platform: str | None = None) -> str:
    if transport not in TRANSPORTS:
        raise ConfigError(f"moe_transport: must be one of {TRANSPORTS}, got {transport!r}")
    if transport != "auto":
        return transport
    platform = platform or jax.default_backend()
    return "capacity" if platform == "cpu" else "ragged"


def ragged_capacity(pairs: int, ep: int, capacity_factor: float | None) -> int:
    """Receive-buffer rows of the ragged transport: every pair of every sender when dropless,
    else capacity_factor x the balanced load (each device receives `pairs` on average)."""
    if capacity_factor is None:
        return pairs * ep
    return max(1, min(pairs * ep, math.ceil(capacity_factor * pairs)))


def capacity(pairs: int, ep: int, capacity_factor: float | None) -> int:
    """Slots per (source, destination) pair: all pairs when dropless."""
    if capacity_factor is None:
        return pairs
    return max(1, min(pairs, math.ceil(capacity_factor * pairs / ep)))


# the experts' and the shared expert's matrices (w1, w3, w2 each): logical names, embed dimension
WEIGHT_NAMES = (("experts", "embed", "expert_mlp"),) * 2 + (("experts", "expert_mlp", "embed"),
                                                           ("embed", "mlp"), ("embed", "mlp"), ("mlp", "embed"))
WEIGHT_EMBED_DIM = (1, 1, 2, 0, 0, 1)


def _gather(w, dim: int, axes: tuple[str, ...]):
    """Inside shard_map: w whole along `dim` (gathered over `axes`, the mesh axes splitting it)."""
    for a in axes:
        w = jax.lax.all_gather(w, a, axis=dim, tiled=True)
    return w


class ExpertParallel:
    """The `experts` hook of model.layers.Hooks for a mesh and a rules table."""

    def __init__(self, mesh, rules: Rules, transport: str = "auto", capacity_factor: float | None = None):
        self.mesh, self.rules = mesh, rules
        self.platform = platform_of(mesh)
        self.transport = choose_transport(transport, self.platform)
        self.capacity_factor = capacity_factor
        w13 = rules.spec(("experts", "embed", "expert_mlp"))
        self.ep_axes, _, self.tp_axes = (_axes(a) for a in w13)
        self.batch_axes = _axes(rules.table["batch"])
        if not set(self.ep_axes) <= set(self.batch_axes):
            raise ConfigError(f"rules.experts: expert axes {self.ep_axes} must also shard the batch "
                              f"{self.batch_axes} so that each expert device holds different tokens")
        self.ep = math.prod(mesh.shape[a] for a in self.ep_axes)
        # collectives over axes of size 1 are copies (XLA:CPU gathered every expert matrix into
        # a new layout each step on a 1-device mesh): left out
        self.tp_axes, self.sum_axes = (
            tuple(a for a in axes if mesh.shape[a] > 1) for axes in (self.tp_axes, self.batch_axes))

    def __call__(self, moe, x_BSD, idx_BSk, wts_BSk):
        rules = self.rules
        tok = rules.spec(("batch", None, None))
        # weights as the matmuls see them (fake-quantised per the model's quant_* fields), each
        # placed as its parameter is (a small one may be whole over fsdp: rules.param_spec)
        weights = (*moe.expert_weights(), moe.shared_w1.weight(), moe.shared_w3.weight(), moe.shared_w2.weight())
        specs = tuple(rules.param_spec(names, w.shape) for names, w in zip(WEIGHT_NAMES, weights))
        gathers = tuple(tuple(a for a in _axes(spec[dim]) if self.mesh.shape[a] > 1)
                        for spec, dim in zip(specs, WEIGHT_EMBED_DIM))
        body = lambda *a: self._body(moe, gathers, *a)  # noqa: E731
        if self.mesh.size > 1:  # (on one device shard_map's backward adds copies: psums of size 1)
            body = jax.shard_map(body, mesh=self.mesh, in_specs=(tok, tok, tok, *specs), out_specs=(tok, P()),
                                 check_vma=False)
        return body(x_BSD, idx_BSk, wts_BSk, *weights)

    def _body(self, moe, gathers, x, idx, wts, *weights):
        cfg = moe.cfg
        b, s, d = x.shape
        dt = jnp.dtype(cfg.dtype)
        w1, w3, w2, sw1, sw3, sw2 = (_gather(w, dim, axes) for w, dim, axes in zip(weights, WEIGHT_EMBED_DIM, gathers))
        xf = x.reshape(b * s, d)
        impl = choose_impl(cfg.moe_impl, self.platform)
        experts = lambda xs, e, valid: self._local_experts(moe, impl, xs, e, valid, w1, w3, w2, dt)  # noqa: E731
        send = self._local if self.ep == 1 else self._capacity if self.transport == "capacity" else self._ragged
        # rows are quantised independently: quantising before the transport is the same rounding;
        # and the experts read them in `dt`: cast before the transport, the same values travel in
        # half the bytes (and the results come back in `dt`, which they already are)
        y, dropped = send(moe.expert_input(xf).astype(dt), idx.reshape(-1), wts.reshape(-1), w1.shape[0], experts)
        xs = moe.shared_w1.quant_input(xf).astype(dt)
        h = swiglu(jnp.einsum("nd,df->nf", xs, sw1.astype(dt)), jnp.einsum("nd,df->nf", xs, sw3.astype(dt)),
                   cfg.swiglu_limit)  # products in `dt`, as MoE.shared's Linear layers
        h = moe.shared_w2.quant_input(h.astype(dt))
        y = y + jnp.einsum("nf,fd->nd", h, sw2.astype(dt)).astype(F32)
        for a in self.tp_axes:
            y = jax.lax.psum(y, a)
        for a in self.sum_axes:
            dropped = jax.lax.psum(dropped, a)
        return y.reshape(b, s, d), dropped

    @staticmethod
    def _local_experts(moe, impl, xs, e, valid, w1, w3, w2, dt):
        """Rows xs [R, D] for local experts e [R] (rows with valid=False give 0): sort by
        expert, grouped matmuls, unsort. The gate weight is applied by the caller."""
        n_local = w1.shape[0]
        key = jnp.where(valid, e, n_local)
        order = jnp.argsort(key)
        sizes = jnp.bincount(key, length=n_local + 1)[:n_local].astype(jnp.int32)
        xo = xs[order].astype(dt)
        h = swiglu(*grouped_matmuls(xo, (w1.astype(dt), w3.astype(dt)), sizes, impl, dt), moe.cfg.swiglu_limit)
        # every product leaves in `dt` (accumulated in float32 inside; DeepSeek's reference rounds
        # w1(x), w3(x) and w2(h) to the activations' dtype too): no float32 [rows, D] or [rows, F]
        # output, nor its cotangent, is kept for the receive buffer's rows
        down = lambda hw: grouped_matmul(moe.expert_input(hw).astype(dt), w2.astype(dt), sizes, impl, dt)  # noqa: E731
        return h, order, sizes, down

    def _run_local(self, experts, xs, e, w, valid):
        """Gate-weighted expert outputs in the rows' order, in the activations' dtype (what
        travels back: the combine adds them in float32)."""
        h, order, _, down = experts(xs, e, valid)
        hw = h * jnp.where(valid, w, 0.0)[order][:, None]
        # invalid rows sort past the groups, where every grouped matmul gives 0 (model/gmm.py):
        # no [rows, D] mask (a select and its mask would be kept for the backward, ~1 GB a layer
        # on the pods)
        out = down(hw).astype(xs.dtype)
        return out[jnp.argsort(order)]  # unsort: a gather by the inverse permutation

    def _local(self, xf, e_flat, w_flat, n_local, experts):
        """No expert axis: every pair stays here; no transport buffers."""
        k = e_flat.shape[0] // xf.shape[0]
        out = self._run_local(experts, jnp.repeat(xf, k, axis=0), e_flat, w_flat, jnp.ones(e_flat.shape, bool))
        return out.astype(F32).reshape(xf.shape[0], k, -1).sum(1), jnp.zeros((), jnp.int32)

    def _capacity(self, xf, e_flat, w_flat, n_local, experts):
        ep, k = self.ep, e_flat.shape[0] // xf.shape[0]
        pairs = e_flat.shape[0]
        c = capacity(pairs, ep, self.capacity_factor)
        token = jnp.arange(pairs) // k
        dest = e_flat // n_local
        onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
        rank = jnp.take_along_axis(jnp.cumsum(onehot, 0) - onehot, dest[:, None], 1)[:, 0]
        keep = rank < c
        slot = jnp.where(keep, dest * c + rank, ep * c)  # ep * c: out of range, dropped
        send_x = jnp.zeros((ep * c, xf.shape[1]), xf.dtype).at[slot].set(xf[token], mode="drop")
        send_e = jnp.full((ep * c,), -1, jnp.int32).at[slot].set(e_flat % n_local, mode="drop")
        send_w = jnp.zeros((ep * c,), F32).at[slot].set(w_flat, mode="drop")
        recv_x, recv_e, recv_w = (self._all_to_all(a) for a in (send_x, send_e, send_w))
        out = self._run_local(experts, recv_x, jnp.maximum(recv_e, 0), recv_w, recv_e >= 0)
        back = self._all_to_all(out)
        contrib = jnp.where(keep[:, None], back[jnp.minimum(slot, ep * c - 1)], 0.0)
        y = jnp.zeros((xf.shape[0], xf.shape[1]), F32).at[token].add(contrib)
        return y, jnp.sum(~keep).astype(jnp.int32)

    def _all_to_all(self, x):
        for a in self.ep_axes:  # one EP axis in practice; several compose as nested exchanges
            x = jax.lax.all_to_all(x, a, 0, 0, tiled=True)
        return x

    def _ragged(self, xf, e_flat, w_flat, n_local, experts):
        if len(self.ep_axes) != 1:
            raise ConfigError("moe_transport: the ragged transport needs exactly one expert axis")
        axis, ep, k = self.ep_axes[0], self.ep, e_flat.shape[0] // xf.shape[0]
        pairs = e_flat.shape[0]
        dest = e_flat // n_local
        order = jnp.argsort(dest, stable=True)
        token = order // k
        sizes = jnp.bincount(dest, length=ep).astype(jnp.int32)
        input_offsets = jnp.cumsum(sizes) - sizes
        all_sizes = jax.lax.all_gather(sizes, axis)                       # [ep senders, ep receivers]
        me = jax.lax.axis_index(axis)
        cap = ragged_capacity(pairs, ep, self.capacity_factor)
        # receiver r takes sender s's chunk after the chunks of senders before s, up to cap rows
        before = jnp.cumsum(all_sizes, 0) - all_sizes
        fit = jnp.clip(cap - before, 0, all_sizes)                         # rows that fit, per pair
        send_sizes, recv_sizes, output_offsets = fit[me], fit[:, me], before[me]

        def exchange(operand, out_rows, in_off, send, out_off, recv):
            out = jnp.zeros((out_rows,) + operand.shape[1:], operand.dtype)
            return jax.lax.ragged_all_to_all(operand, out, in_off, send, out_off, recv, axis_name=axis)

        recv_x = exchange(xf[token], cap, input_offsets, send_sizes, output_offsets, recv_sizes)
        recv_e = exchange((e_flat % n_local)[order], cap, input_offsets, send_sizes, output_offsets, recv_sizes)
        recv_w = exchange(w_flat[order], cap, input_offsets, send_sizes, output_offsets, recv_sizes)
        valid = jnp.arange(cap) < jnp.sum(recv_sizes)
        out = self._run_local(experts, recv_x, recv_e, recv_w, valid)
        # send results back: roles of sizes and offsets swap
        back_in_off = jnp.cumsum(recv_sizes) - recv_sizes
        back_out_off = (jnp.cumsum(all_sizes, 1) - all_sizes)[:, me]        # the senders' chunk starts
        back = exchange(out, pairs, back_in_off, recv_sizes, back_out_off, send_sizes)
        y = jnp.zeros((xf.shape[0], xf.shape[1]), F32).at[token].add(back)  # pairs not sent: 0
        return y, (pairs - jnp.sum(send_sizes)).astype(jnp.int32)
