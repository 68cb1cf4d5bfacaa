"""Load DeepSeek-V4 checkpoints as released: safetensors shards, DeepSeek's own tensor names or
Hugging Face's, FP8 / FP4 block-quantised weights, streamed onto a model (optionally a mesh).

A checkpoint directory holds `config.json` (either spelling, see model/hf.py) and the tensors:
the shards of exactly one `*.safetensors.index.json` (its `weight_map`), or else every
`*.safetensors` file. Quantised weights are recognised by their stored dtype:
  F8_E4M3 [out, in] + `.scale` [ceil(out/128), ceil(in/128)]       FP8, 128 x 128 blocks
  I8/U8 [out, in/2] + `.scale` [out, ceil(in/32)]                  FP4 (e2m1, low nibble first), 1 x 32
and scales are UE8M0 (F8_E8M0, 2^(byte - 127)) or float. They are dequantised exactly (every
product is a power-of-two multiple of a short code) to float32, then cast to the parameter dtype.

Memory: the model is built abstractly (no parameter memory) and filled one parameter at a time,
one device shard at a time: each shard is assembled from only the source tensors
it covers (the experts and layers that device holds), goes to its device and is dropped. Host
memory is about one device shard plus one source tensor, never a whole stacked parameter (160 GiB
in float32 for V4-Flash's largest) and never the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm import tqdm

from . import quant
from .hf import _mtp_targets, _resolve, _targets, config_from_hf
from .transformer import Model

FP8_BLOCK, FP4_BLOCK = (128, 128), (1, 32)
_FLOAT = {"F64", "F32", "F16", "BF16"}
_INT = {"I64", "I32", "I16", "I8", "U8", "U16", "U32"}
_SCALE_SUFFIXES = (".scale", ".weight_scale_inv")   # DeepSeek's name, HF's fine-grained FP8 name

# --- DeepSeek's names -> Hugging Face's (checked against transformers' conversion table
# "deepseek_v4" and the released V4-Flash index). The layouts are the same ([out, in]) except
# the routed experts: one tensor per expert here, fused [E, ...] tensors in HF.
_TOP = {
    "embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale",
}
# inside `layers.N.` (HF: `model.layers.N.`) and `mtp.J.` (HF in model/hf.py: `mtp.J.`)
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight", "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight", "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight", "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight", "attn.attn_sink": "self_attn.sinks",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
for _ds, _hf in (("attn.compressor.", "self_attn.compressor."),
                 ("attn.indexer.compressor.", "self_attn.compressor.indexer.")):
    _BLOCK.update({_ds + "wkv.weight": _hf + "kv_proj.weight", _ds + "wgate.weight": _hf + "gate_proj.weight",
                   _ds + "ape": _hf + "position_bias", _ds + "norm.weight": _hf + "kv_norm.weight"})
_MTP = {  # only in `mtp.J.`
    "e_proj.weight": "e_proj.weight", "h_proj.weight": "h_proj.weight", "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight", "norm.weight": "norm.weight", "hc_head_fn": "hc_head.hc_fn",
    "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale",
}
# `ffn.experts.E.wK.weight` [out, in] -> (fused HF tensor, which of its "|" targets)
_EXPERTS = {"w1": ("mlp.experts.gate_up_proj", 0), "w3": ("mlp.experts.gate_up_proj", 1),
            "w2": ("mlp.experts.down_proj", 0)}


def _transpose(x):
    return x.T


def _deepseek_targets(hf_targets: dict, n_experts: int) -> dict:
    """DeepSeek name -> (module, index, paths, transform), from the HF-named targets."""
    top = {v: k for k, v in _TOP.items()}
    layer = {v: k for k, v in _BLOCK.items()}
    mtp = {v: k for k, v in {**_BLOCK, **_MTP}.items()}
    out = {}
    for name, (module, index, path, fn) in hf_targets.items():
        index = () if index is None else (index,)
        if name in top:
            out[top[name]] = (module, index, tuple(path.split("|")), fn)
            continue
        kind, n, rest = re.fullmatch(r"(model\.layers|mtp)\.(\d+)\.(.+)", name).groups()
        prefix = f"{'layers' if kind == 'model.layers' else 'mtp'}.{n}."
        block = layer if kind == "model.layers" else mtp
        if rest in block:
            out[prefix + block[rest]] = (module, index, tuple(path.split("|")), fn)
        for w, (fused, part) in _EXPERTS.items():
            if rest == fused:
                for e in range(n_experts):
                    out[f"{prefix}ffn.experts.{e}.{w}.weight"] = (
                        module, index + (e,), (path.split("|")[part],), _transpose)
    return out


# --- files ------------------------------------------------------------------------------
@contextlib.contextmanager
def _numpy_float8_names():
    """safetensors' numpy path (0.8, issue #682) looks F8 dtypes up as attributes of `numpy`,
    which has none: lend it ml_dtypes' types while reading, and take them back afterwards.
    Only names numpy lacks are set, so a fixed safetensors or numpy is left alone."""
    added = [n for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu") if not hasattr(np, n)]
    for n in added:
        setattr(np, n, getattr(ml_dtypes, n))
    try:
        yield
    finally:
        for n in added:
            delattr(np, n)


def _shard_files(path: Path) -> tuple[dict[str, Path], list[Path]]:
    """(tensor name -> file, every file) from the one index, or else every *.safetensors."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{path}: several index files {[p.name for p in indexes]}; keep exactly one")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        where = {name: path / f for name, f in weight_map.items()}
        for name, f in where.items():
            if not f.is_file():
                raise FileNotFoundError(f"{f.name}: listed in {indexes[0].name} (for {name}) "
                                        f"but missing from {path}")
        return where, sorted(set(where.values()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files and no *.safetensors.index.json")
    return {}, files


def _open(files: list[Path], where: dict[str, Path], stack: contextlib.ExitStack):
    """Open every file (headers only; tensors are read with pread(2), not memory-mapped: mapped
    pages of a 150 GB checkpoint would stay resident) -> (name -> handle, names in file
    order). A truncated or corrupt file fails here, before any data is read."""
    handles, order = {}, []
    for f in files:
        try:
            h = stack.enter_context(safe_open(str(f), framework="np", backend="pread"))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ValueError(f"{f.name}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        keys = list(getattr(h, "offset_keys", h.keys)())
        for name in keys:
            if where and where.get(name) != f:
                continue  # the index is the authority on which file holds a name
            if name in handles:
                raise ValueError(f"{name}: stored in both {handles[name][1].name} and {f.name}")
            handles[name] = (h, f)
            order.append(name)
    for name, f in where.items():
        if name not in handles:
            raise KeyError(f"{name}: listed in the index for {f.name} but not in that file")
    return handles, order


# --- planning: every check before any data is read ----------------------------------------
def _is_scale(name: str) -> str | None:
    """The weight a block-scale name belongs to, or None if `name` is not a scale."""
    for suffix in _SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return None


def _source(name, handles, var_dtype, scales) -> tuple[str, tuple, str | None]:
    """(format, logical [out, in] / stored shape, scale name) of one weight, validated."""
    s = handles[name][0].get_slice(name)
    dtype, shape = s.get_dtype(), tuple(s.get_shape())
    scale = scales.get(name)
    is_float = np.issubdtype(var_dtype, np.floating)
    if dtype == "F8_E4M3" or (dtype in ("I8", "U8") and is_float):
        fmt, block = ("fp8", FP8_BLOCK) if dtype == "F8_E4M3" else ("fp4", FP4_BLOCK)
        if scale is None:
            raise ValueError(f"{name}: stored as {dtype} (quantised {fmt}) but has no block scale "
                             f"({' or '.join(name[:-7] + s for s in _SCALE_SUFFIXES)})")
        if len(shape) != 2:
            raise ValueError(f"{name}: a quantised weight must be 2-D [out, in]; got shape {shape}")
        logical = shape if fmt == "fp8" else (shape[0], 2 * shape[1])
        ss = handles[scale][0].get_slice(scale)
        want = tuple(-(-n // b) for n, b in zip(logical, block))
        if tuple(ss.get_shape()) != want:
            raise ValueError(f"{scale}: shape {tuple(ss.get_shape())}, but {name} {shape} ({fmt}) "
                             f"needs {want} ({block[0]} x {block[1]} blocks)")
        if ss.get_dtype() not in _FLOAT | {"F8_E8M0"}:
            raise ValueError(f"{scale}: unsupported scale dtype {ss.get_dtype()} (F8_E8M0 or float)")
        return fmt, logical, scale
    if scale is not None:
        raise ValueError(f"{scale}: block scales for {name}, which is stored as {dtype}, not FP8 / FP4")
    if dtype not in (_FLOAT if is_float else _INT):
        raise ValueError(f"{name}: unsupported dtype {dtype} for a {np.dtype(var_dtype).name} parameter")
    return "plain", shape, None


def _check_shape(name, shape, target, cache) -> None:
    """The transform of a `shape` tensor must give the parameter's (sliced) shape."""
    module, index, paths, fn = target
    want = [tuple(_resolve(module, p).get_value().shape[len(index):]) for p in paths]
    key = (fn, shape)
    if key not in cache:
        try:
            out = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.float32))
            cache[key] = [tuple(o.shape) for o in (out if isinstance(out, tuple) else (out,))]
        except (TypeError, ValueError):
            cache[key] = None
    if cache[key] != want:
        show = lambda shapes: shapes[0] if len(shapes) == 1 else shapes  # noqa: E731
        got = "" if cache[key] in (None, [shape]) else f" ({show(cache[key])} in our layout)"
        where = "|".join(paths) + (f" at index {list(index)}" if index else "")
        raise ValueError(f"{name}: shape {shape}{got} does not fit {where}, which expects {show(want)}")


def _plan(model: Model, handles: dict, order: list[str]):
    """Jobs [(variables, [(name, index, transform, source)])]: one per group of parameters
    filled together (one, or w1 and w3 from HF's fused gate_up_proj), in file order."""
    hf_targets = {**_targets(model), **_mtp_targets(model)}
    deepseek = not any(n.startswith(("model.", "lm_head.")) for n in order)
    targets = _deepseek_targets(hf_targets, model.cfg.n_routed_experts) if deepseek else {
        name: (mod, () if i is None else (i,), tuple(path.split("|")), fn)
        for name, (mod, i, path, fn) in hf_targets.items()}
    scales = {}
    for name in order:
        weight = None if name in targets else _is_scale(name)
        if weight is not None:
            if weight not in handles:
                raise KeyError(f"{name}: a block scale without its weight {weight}")
            scales[weight] = name
    scale_names = set(scales.values())
    unknown = [n for n in order if n not in targets and n not in scale_names]
    missing = [n for n in targets if n not in handles]
    if unknown or missing:
        hint = ""
        if any(n.startswith("mtp.") for n in unknown + missing):
            hint = (f" (the config asks for n_mtp_layers={model.cfg.n_mtp_layers}; pass n_mtp_layers= "
                    f"to match the checkpoint's mtp.* blocks)")
        raise KeyError(f"load_pretrained: unknown names {_few(unknown)}; missing names {_few(missing)}{hint}")
    jobs, owner, cache = {}, {}, {}
    for name in order:
        if name not in targets:
            continue
        module, index, paths, fn = targets[name]
        variables = tuple(_resolve(module, p) for p in paths)
        key = (id(module), paths)
        for v in variables:  # a parameter filled from two groups would be placed half-empty
            assert owner.setdefault(id(v), key) == key, f"{name}: parameter shared by two target groups"
        src = _source(name, handles, variables[0].get_value().dtype, scales)
        _check_shape(name, src[1], targets[name], cache)
        jobs.setdefault(key, (variables, []))[1].append((name, index, fn, src))
    return list(jobs.values())


def _few(names: list[str], n: int = 20) -> str:
    return f"{sorted(names)[:n]}{' ...' if len(names) > n else ''}"


# --- reading --------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("fmt", "shape"))
def _dequantize(codes, scales, fmt: str, shape: tuple):
    """Stored codes + block scales -> float32 [out, in]. Edge blocks are ragged (ceil-divided):
    pad with zeros to whole blocks, dequantise with model/quant.py, cut back."""
    block = FP8_BLOCK if fmt == "fp8" else FP4_BLOCK
    values = codes if fmt == "fp8" else quant.unpack_e2m1(codes.view(jnp.uint8))
    if scales.dtype == jnp.float8_e8m0fnu:
        scales = quant.ue8m0_decode(scales.view(jnp.uint8))
    padded = [-(-n // b) * b for n, b in zip(shape, block)]
    values = jnp.pad(values, [(0, p - n) for p, n in zip(padded, shape)])
    out = quant.dequantize(values, scales.astype(jnp.float32), "e4m3" if fmt == "fp8" else "e2m1", block)
    return out[: shape[0], : shape[1]]


def _host():
    """Dequantise on the host CPU (the data is there, and goes to its devices once, in the
    parameter dtype); JAX_PLATFORMS without cpu falls back to the default device."""
    try:
        return jax.default_device(jax.devices("cpu")[0])
    except RuntimeError:
        return contextlib.nullcontext()


def _read(name, source, handles) -> np.ndarray:
    fmt, shape, scale = source
    x = handles[name][0].get_tensor(name)
    if fmt == "plain":
        return x
    with _host():
        return np.asarray(_dequantize(x, handles[scale][0].get_tensor(scale), fmt, shape))


def _shard_reader(k: int, var, items, handles):
    """fill(index) -> the slice `index` (a tuple of slices) of parameter `var`, k-th target of
    its group, built from only the source tensors that slice covers: a device holding experts
    0..7 of a stacked layer reads those experts' tensors and nothing else. The last slice built
    is kept, for the devices that hold a replica of it."""
    shape, dtype = var.get_value().shape, var.get_value().dtype
    last = {}

    def fill(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        if key in last:
            return last[key]
        ranges = [range(*r) for r in key]
        local = np.empty([len(r) for r in ranges], dtype)
        for name, lead, fn, source in items:  # lead: (layer,) / (layer, expert) / ()
            if not all(i in r for i, r in zip(lead, ranges)):
                continue
            out = fn(_read(name, source, handles))
            value = out[k] if isinstance(out, tuple) else out
            pos = tuple(r.index(i) for i, r in zip(lead, ranges))
            local[pos] = value[index[len(lead):]]  # casts to the parameter dtype (nearest even)
        last.clear()
        last[key] = local
        return local

    return fill


def _fill(jobs, handles, place, hold) -> None:
    """Every parameter placed from its shard readers: host memory is one device shard plus the
    source tensors it reads, never a whole (stacked) parameter. A parameter in `hold` (by id:
    model.storage.holders) is held quantised as soon as it is placed."""
    with tqdm(total=sum(len(v) for v, _ in jobs), desc="load_pretrained", unit="param", disable=None,
              file=sys.stderr) as bar:
        for variables, items in jobs:
            for k, v in enumerate(variables):
                v.set_value(place(v, _shard_reader(k, v, items, handles)))
                if id(v) in hold:
                    hold.pop(id(v))()  # the module now holds e4m3 / e2m1 codes instead of v
                    v.set_value(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype))  # jobs keep v
                bar.update()


def pretrained_config(path, **overrides):
    """The ModelConfig of a checkpoint directory's config.json (either spelling)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: missing; a checkpoint directory needs "
                                f"its config.json")
    return config_from_hf(json.loads((path / "config.json").read_text()), **overrides)


def load_pretrained(path, mesh=None, rules=None, hold: bool = False, **overrides) -> Model:
    """The model of a DeepSeek-V4 checkpoint directory (see the module docstring), with
    ModelConfig `overrides` (dtype, param_dtype, n_mtp_layers=0 for a checkpoint without MTP...).
    With a `mesh`, every parameter is placed with the NamedSharding of its logical axes under
    `rules` (default parallel.Rules()): the model is never whole on one device. `hold` (with
    quant_matmul / quant_experts on): each weight those quantise is held quantised
    (model/storage.py) as soon as it is read, so that device memory peaks at the held model
    plus one float weight, not the float model; the result equals loading, then
    hold_quantized(model)."""
    from .config import ConfigError
    from .storage import check_holdable, holders

    path = Path(path)
    cfg = pretrained_config(path, **overrides)
    if hold:
        check_holdable(cfg)
        if mesh is not None:
            raise ConfigError("load_pretrained: hold=True places the model on one device; held weights "
                              "over a mesh are not supported (load without hold, or without mesh)")
    model = nnx.eval_shape(lambda: Model(cfg, nnx.Rngs(0)))
    if mesh is None:
        place = lambda v, fill: jax.device_put(fill(()))  # noqa: E731
    else:
        if rules is None:
            from parallel.rules import Rules  # parallel/ builds on model/: import it only when asked

            rules = Rules()

        def place(v, fill):
            sharding = jax.sharding.NamedSharding(mesh, rules.var_spec(v))
            # each process builds only its devices' slices: works on multi-host meshes too
            return jax.make_array_from_callback(v.get_value().shape, sharding, fill)
    where, files = _shard_files(path)
    with contextlib.ExitStack() as stack, _numpy_float8_names():
        handles, order = _open(files, where, stack)
        _fill(_plan(model, handles, order), handles, place, holders(model) if hold else {})
    empty = [p for p, v in nnx.iter_graph(model)
             if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    assert not empty, f"load_pretrained: parameters left unfilled: {empty[:5]}"
    return model

