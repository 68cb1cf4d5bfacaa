"""Building blocks: parameters with logical axis names, RMSNorm, linear maps, rotary embedding.

Legend: B batch, S sequence, D model dim, K head dim, R rope dim (last R dims of a head).
Every parameter carries logical axis names in its `out_sharding` metadata (parallel/rules.py maps
them to mesh axes); `eager_sharding=False` keeps the model free of any mesh.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from . import quant
from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Where parallel/ plugs into the model without the model knowing any mesh:
    `constrain(x, names)` pins an activation's sharding by logical names, and `experts(moe, x,
    idx, wts)` replaces the single-device expert computation (expert parallelism); `top_k(x, k)`
    replaces jax.lax.top_k where the mesh's compiler would not split it (sorted_top_k).

    The hooks in force live in a context variable, set only by `using_hooks` (a context manager:
    parallel.sharded / parallel.activation_sharding): what a trace sees is scoped to the `with`
    block and to the thread (or asyncio task) that entered it, and restored on exit."""
    constrain: Callable | None = None
    experts: Callable | None = None
    top_k: Callable | None = None


_HOOKS: contextvars.ContextVar[Hooks] = contextvars.ContextVar("deepflax_model_hooks", default=Hooks())


def hooks() -> Hooks:
    """The hooks in force for the current trace."""
    return _HOOKS.get()


@contextlib.contextmanager
def using_hooks(**changes):
    """Inside: the current hooks with `changes` (constrain=..., experts=...) replaced."""
    token = _HOOKS.set(dataclasses.replace(_HOOKS.get(), **changes))
    try:
        yield
    finally:
        _HOOKS.reset(token)


def constrain(x, names):
    """Constrain activation `x` to the sharding of its logical axis `names` (no-op off-mesh)."""
    fn = _HOOKS.get().constrain
    return x if fn is None else fn(x, tuple(names))


def top_k(x, k: int):
    """(values, indices) of the k largest entries along the last axis: jax.lax.top_k, or the
    hooks' replacement (parallel.sharded installs sorted_top_k on CPU meshes)."""
    fn = _HOOKS.get().top_k
    return jax.lax.top_k(x, k) if fn is None else fn(x, k)


def sorted_top_k(x, k: int):
    """jax.lax.top_k(x, k) by one stable sort of the last axis, equal to it bit for bit: larger
    first in IEEE total order (+0 before -0, which sums of ReLUs produce), ties to the lower index.

    Why: XLA:CPU lowers top_k to a TopK custom call that the SPMD partitioner does not split, so
    on a batch-split mesh every device gathered the whole batch's router and index scores first
    (ten all-gathers a step on `tiny` at fsdp=8); a sort it splits over the other axes."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float total order as int order
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    _, idx, vals = jax.lax.sort((~key, iota, x), dimension=x.ndim - 1, is_stable=True, num_keys=1)
    return vals[..., :k], idx[..., :k]


class RoutingBias(nnx.Variable):
    """Per-expert selection bias: updated by the balancing rule, never by the optimiser."""


class HashTable(nnx.Variable):
    """Frozen token -> experts table of hash-routed layers (int32)."""


class QuantValues(nnx.Variable):
    """A weight held quantised for inference (model.storage.hold_quantized): e4m3 values, or
    e2m1 codes packed two per byte (uint8, first element in the low nibble)."""


class QuantScales(nnx.Variable):
    """The UE8M0 scale bytes of a QuantValues weight, one per block (2^(byte - 127))."""


def dtype_of(name: str):
    return jnp.dtype(name)


def normal(rngs: nnx.Rngs, shape, axes, std: float, dtype="float32") -> nnx.Param:
    assert len(axes) == len(shape), (shape, axes)
    value = std * jax.random.normal(rngs.params(), shape, dtype_of(dtype))
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def constant(shape, axes, value: float, dtype="float32") -> nnx.Param:
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(jnp.full(shape, value, dtype_of(dtype)), out_sharding=tuple(axes),
                     eager_sharding=False)


def rms_normalize(x, eps: float):
    """Weightless RMSNorm computed in float32, returned in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """RMSNorm with an fp32 weight; the result is cast back to the input dtype."""

    def __init__(self, size: int, eps: float, axis_name: str):
        self.eps = eps
        self.weight = constant((size,), (axis_name,), 1.0)

    def __call__(self, x):
        return (self.weight[...] * rms_normalize(x, self.eps)).astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ w with w stored [in..., out...]; computes in `dtype` (float32 for fp32 paths).

    fp8=True marks one of DeepSeek's FP8 matmuls: with cfg.quant_matmul = "fp8" the input is
    fake-quantised (1 x cfg.quant_block blocks along its last axis) and so is the weight, in
    cfg.quant_block^2 tiles of (its contracted axis `in_axis`, its last axis), any other axis
    (heads, groups) indexing separate matrices. cfg.quant_matmul_impl = "native" multiplies the
    e4m3 values themselves (quant.fp8_einsum) instead of the dequantised ones."""

    def __init__(self, shape, axes, cfg: ModelConfig, rngs: nnx.Rngs, dtype: str | None = None,
                 fp8: bool = False, in_axis: int = 0):
        self.dtype = dtype or cfg.dtype
        self.fp8_site = fp8
        self.quant = cfg.quant_matmul if fp8 else "none"
        self.native = self.quant == "fp8" and cfg.quant_matmul_impl == "native"
        self.block, self.in_axis = cfg.quant_block, in_axis
        self.in_end = in_axis - len(shape)  # the contracted axis counted from the end (layer stacks)
        self.held = False                   # True: the weight is e4m3 values + scale bytes (hold_quantized)
        self.w = normal(rngs, tuple(shape), axes, cfg.init_std, cfg.param_dtype)

    def weight(self):
        """The weight as the matmul sees it (fake-quantised when quant is on)."""
        if self.held:
            return quant.dequantize_tiles(self.wq[...], quant.ue8m0_decode(self.ws[...]), self.in_end, self.block)
        w = self.w[...]
        return w if self.quant == "none" else fp8_weight(w, self.in_axis, self.block)

    def hold_quantized(self):
        """Replace the float weight by what the fp8 matmul sees, held as e4m3 values (wq) and
        one UE8M0 byte per tile (ws): a quarter of float32's bytes. Inference only (a held
        weight has no gradient); weight() is unchanged to the bit."""
        if self.quant != "fp8":
            raise ValueError("hold_quantized: this Linear is not an fp8 matmul (quant_matmul=fp8 sites only)")
        meta = self.w.get_metadata()
        values, scales = quant.held_tiles(self.w[...], self.in_end, self.block)
        self.wq = QuantValues(values, **meta)
        self.ws = QuantScales(scales, **meta)
        del self.w
        self.held = True

    def quant_input(self, x):
        return x if self.quant == "none" else quant.qdq(x, "e4m3", self.block)

    def __call__(self, x, spec: str = "...i,io->...o"):
        dt = dtype_of(self.dtype)
        if self.native:  # a held weight re-quantises to the same values
            return quant.fp8_einsum(spec, x, self.weight() if self.held else self.w[...], self.block,
                                    self.in_axis, dt)
        return jnp.einsum(spec, self.quant_input(x).astype(dt), self.weight().astype(dt))


def fp8_weight(w, in_axis: int, block: int):
    """w fake-quantised to e4m3 in block x block tiles of (axis in_axis, last axis)."""
    w = jnp.moveaxis(w, in_axis, -2)
    return jnp.moveaxis(quant.qdq(w, "e4m3", (block, block)), -2, in_axis)


# --- rotary embedding -------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig, compressed: bool):
    """Inverse frequencies of the R/2 interleaved pairs. Layers with a compressor use
    compress_rope_theta with YaRN interpolation (no attention-scale factor, as the reference);
    window-only layers use plain rope_theta."""
    dim = cfg.rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if not compressed or cfg.original_seq_len <= 0:
        return freqs

    def correction_dim(rotations):
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 = keep the original frequency (high-frequency pairs)
    return freqs / cfg.rope_factor * (1.0 - keep) + freqs * keep


def rope_angles(cfg: ModelConfig, positions, compressed: bool):
    """Angles [..., R/2] for integer positions."""
    return positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg, compressed)


def apply_rope(x, angles, inverse: bool = False):
    """Rotate the last R dims of x [B, S, R'] or [B, S, H, R'] (interleaved pairs) by `angles`
    [S, R/2]. inverse=True applies the opposite rotation. One elementwise pass over all of x:
    the first R' - R dims get angle 0 (cos 1, sin 0, exact) instead of a slice and a concatenate
    (whose backward pads: both were copies of x on XLA:CPU)."""
    half = x.shape[-1] // 2
    angles = jnp.pad(angles, [(0, 0)] * (angles.ndim - 1) + [(half - angles.shape[-1], 0)])
    if x.ndim == 4:  # broadcast over the head axis
        angles = angles[:, None, :]
    cos, sin = jnp.cos(angles)[..., None], jnp.sin(angles)
    sin = jnp.stack([sin, -sin] if inverse else [-sin, sin], axis=-1)  # pair (e, o): e*c - o*s, o*c + e*s
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], half, 2)
    return (pairs * cos + pairs[..., ::-1] * sin).reshape(x.shape).astype(x.dtype)
