"""model/quant.py against a NumPy re-derivation of DeepSeek's block-quantisation rules.

The oracle rounds by hand (grid step from the binary exponent, np.round = ties to even), so
it shares no code with XLA's float8 / float4 conversions."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from model import quant
from model.config import ConfigError
from sizes import SMALL

# format -> (max, amax floor, mantissa bits, smallest normal exponent)
SPEC = {"e4m3": (448.0, 1e-4, 3, -6), "e2m1": (6.0, 6.0 * 2.0 ** -126, 1, 0)}


def round_to_format(v, fmt):
    """v (float64, |v| <= max) rounded to the format's grid, ties to even."""
    _, _, mbits, emin = SPEC[fmt]
    mag = np.abs(v)
    e = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    step = 2.0 ** (np.maximum(e, emin) - mbits)   # subnormals share the smallest normal's step
    return np.round(v / step) * step


def oracle_qdq(x, fmt, block, ue8m0=True):
    fmax, floor, _, _ = SPEC[fmt]
    x = np.asarray(x, np.float32)
    block = (block,) if isinstance(block, int) else block
    if len(block) == 1:
        xb = x.reshape(*x.shape[:-1], -1, block[0])
        axes = (-1,)
    else:
        r, c = block
        xb = x.reshape(*x.shape[:-2], x.shape[-2] // r, r, x.shape[-1] // c, c)
        axes = (-3, -1)
    amax = np.max(np.abs(xb), axis=axes, keepdims=True)
    scale = np.maximum(amax, np.float32(floor)) * np.float32(1.0 / fmax)   # float32, as DeepSeek
    if ue8m0:
        scale = 2.0 ** np.ceil(np.log2(scale.astype(np.float64)))
    v = np.clip(xb.astype(np.float64) / scale, -fmax, fmax)
    out = (round_to_format(v, fmt) * scale).astype(np.float32)
    bad = ~np.all(np.isfinite(xb), axis=axes, keepdims=True)
    return np.where(bad, np.nan, out).reshape(x.shape)


def awkward(rng, shape, block_len):
    """Random values with the edge cases in whole blocks: zeros, tiny amax, +-max, subnormals."""
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, shape))).astype(np.float32)
    flat = x.reshape(-1, block_len)
    flat[0] = 0.0                                              # all-zero block
    flat[1] = rng.uniform(-1e-5, 1e-5, block_len)              # amax below the 1e-4 floor
    flat[2, :2] = [448.0, -448.0]                              # the e4m3 extremes
    flat[3, :2] = [6.0, -6.0]                                  # the e2m1 extremes
    flat[4] = rng.uniform(-1, 1, block_len) * 1e-39            # float32 subnormals
    flat[5] = np.float32(2.0 ** -3) * np.arange(block_len)     # exact grid points / ties
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])     # e2m1 ties, nudged 2^-13 up and down:
    flat[6] = np.resize(np.concatenate([[6.0], mids * (1 + 2.0 ** -13), mids * (1 - 2.0 ** -13), [-5.99]]),
                        block_len)                             # a cast that rounds via float16 gets them wrong
    return flat.reshape(shape)


@pytest.mark.parametrize("fmt,block,shape", [
    ("e4m3", 128, (6, 512)), ("e4m3", 64, (4, 3, 448)), ("e2m1", 32, (8, 256)),
    ("e4m3", (128, 128), (256, 384)), ("e2m1", (4, 32), (2, 16, 64)),
])
def test_qdq_bit_exact_against_numpy(fmt, block, shape):
    rng = np.random.default_rng(0)
    x = awkward(rng, shape, block if isinstance(block, int) else shape[-1])
    got = np.asarray(jax.jit(lambda v: quant.qdq(v, fmt, block))(x))
    want = oracle_qdq(x, fmt, block)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # the floor: an all-zero block stays zero, a block below 1e-4 keeps a finite scale
    values, scales = quant.quantize(x, fmt, block)
    assert np.all(np.isfinite(np.asarray(scales)))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(values, scales, fmt, block)), got)


def test_float32_scales_and_formats_match_ml_dtypes():
    rng = np.random.default_rng(1)
    x = awkward(rng, (8, 128), 128)
    got = np.asarray(quant.qdq(x, "e4m3", 128, scale_fmt="float32"))
    np.testing.assert_array_equal(got, oracle_qdq(x, "e4m3", 128, ue8m0=False))
    values, _ = quant.quantize(x, "e2m1", 32)
    grid = np.asarray(values).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert set(np.abs(grid).ravel()) <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}


def test_ue8m0_scales_are_powers_of_two_rounded_up():
    x = jnp.asarray([[448.0 * 2 ** -3] + [0.0] * 127,          # amax / 448 exactly 2^-3
                     [448.0 * 2 ** -3 * 1.01] + [0.0] * 127])  # just above: rounds up to 2^-2
    _, scales = quant.quantize(x, "e4m3", 128)
    np.testing.assert_array_equal(np.asarray(scales)[:, 0], [2.0 ** -3, 2.0 ** -2])
    assert np.asarray(quant.ue8m0_encode(scales)).tolist() == [[124], [125]]
    np.testing.assert_array_equal(np.asarray(quant.ue8m0_decode(quant.ue8m0_encode(scales))), scales)


def test_pow2_ceil_on_every_exponent():
    """pow2_ceil (integer ops on the bits) against NumPy's frexp in float64: every power of two
    of float32 (normal and subnormal), the next float above each, random values over the whole
    range; the largest float rounds up to inf."""
    rng = np.random.default_rng(0)
    pows = 2.0 ** np.arange(-149, 128)
    x = np.concatenate([pows, np.nextafter(pows[:-1].astype(np.float32), np.float32(np.inf)),
                        rng.uniform(0.5, 1.0, 20000) * 2.0 ** rng.integers(-148, 128, 20000)]).astype(np.float32)
    m, e = np.frexp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        want = np.ldexp(1.0, np.where(m == 0.5, e - 1, e)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(quant.pow2_ceil(jnp.asarray(x))), want)
    assert np.isinf(np.asarray(quant.pow2_ceil(jnp.float32(np.finfo(np.float32).max))))


def test_non_finite_input_gives_nan_blocks():
    x = np.ones((3, 64), np.float32)
    x[0, 5], x[1, 7] = np.inf, np.nan
    out = np.asarray(quant.qdq(x, "e2m1", 32))
    assert np.isnan(out[0, :32]).all() and np.isnan(out[1, :32]).all()
    np.testing.assert_array_equal(out[0, 32:], 1.0)
    np.testing.assert_array_equal(out[2], 1.0)


def test_straight_through_gradient_is_identity():
    x = jax.random.normal(jax.random.key(0), (4, 64), jnp.float32) * 10
    g = jax.random.normal(jax.random.key(1), (4, 64), jnp.float32)
    for fmt, block in (("e4m3", 32), ("e2m1", (2, 32))):
        _, vjp = jax.vjp(lambda v: quant.qdq(v, fmt, block), x)
        np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))


def test_qdq_keeps_shape_and_dtype():
    x = jax.random.normal(jax.random.key(0), (2, 3, 128), jnp.bfloat16)
    y = quant.qdq(x, "e4m3", 64)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    # bf16 holds every e4m3 value times a power of two exactly
    want = oracle_qdq(np.asarray(x, np.float32), "e4m3", 64)
    np.testing.assert_array_equal(np.asarray(y, np.float32), want)


def test_pack_e2m1_round_trip_low_nibble_first():
    values = jnp.asarray([[0.5, -6.0, 1.0, 0.0]], jnp.float4_e2m1fn)
    packed = quant.pack_e2m1(values)
    # codes: 0.5 = 0b0001, -6 = 0b1111, 1.0 = 0b0010, 0 = 0b0000
    assert np.asarray(packed).tolist() == [[0xF1, 0x02]]
    np.testing.assert_array_equal(np.asarray(quant.unpack_e2m1(packed), np.float32),
                                  np.asarray(values, np.float32))


def test_hadamard_is_orthonormal():
    x = jax.random.normal(jax.random.key(2), (3, 32))
    y = quant.hadamard(x)
    np.testing.assert_allclose(np.asarray(y @ y.T), np.asarray(x @ x.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(quant.hadamard(y)), np.asarray(x), atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: quant.qdq(jnp.ones((4, 100)), "e4m3", 128), "does not divide"),
    (lambda: quant.qdq(jnp.ones((4, 128)), "e5m2", 128), "unknown format"),
    (lambda: quant.quantize(jnp.ones((100, 128)), "e4m3", (128, 128)), "does not divide"),
    (lambda: quant.dequantize(jnp.ones((4, 128)), jnp.ones((4, 2)), "e4m3", 128), r"expected \(4, 1\)"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


# --- where the model quantises ---------------------------------------------------------------
ALL_ON = dict(quant_matmul="fp8", quant_experts="fp4", quant_kv="fp8", quant_indexer="fp4",
              quant_block=16, quant_fp4_block=32, quant_kv_block=8, scan_max_period=1)
FP8_LINEARS = {"wq_a", "wq_b", "wkv", "wo_b", "shared_w1", "shared_w3", "shared_w2", "e_proj", "h_proj"}


def _tiny(**kw):
    from flax import nnx

    from model import config, transformer
    cfg = config.preset("tiny", **kw)
    return cfg, transformer.build(cfg, rngs=nnx.Rngs(0))


def test_every_listed_site_is_quantised_and_no_other(monkeypatch):
    """tiny, every switch on, each layer traced once (scan_max_period=1): count the
    fake-quantisations by (format, block) against the architecture's sites, by hand."""
    cfg, model = _tiny(**ALL_ON)
    calls = []
    real = quant.qdq
    monkeypatch.setattr(quant, "qdq", lambda x, fmt, block, **kw: calls.append((fmt, block)) or real(x, fmt, block, **kw))
    ids = jnp.zeros((1, 32), jnp.int32)
    jax.eval_shape(lambda: model(ids))
    blocks = cfg.n_layers + cfg.n_mtp_layers                                   # 7
    csa = sum(cfg.is_csa(r) for r in cfg.compress_ratios)                      # 3 (indexers)
    compressed = sum(r > 0 for r in cfg.compress_ratios)                       # 5
    linears = 7 * blocks + csa + 2 * cfg.n_mtp_layers   # q_a q_b kv o_b + 3 shared; index q; e/h proj
    want = {("e4m3", (16, 16)): linears,                 # their weights
            ("e4m3", (16,)): linears + 2 * blocks,       # their inputs + both routed expert inputs
            ("e2m1", (32, 1)): 3 * blocks,               # routed expert weights
            ("e2m1", (32,)): 2 * csa,                    # index queries and keys
            ("e4m3", (8,)): blocks + compressed}         # window KV and compressed KV
    got = {}
    for fmt, block in calls:
        key = (fmt, block if isinstance(block, tuple) else (block,))
        got[key] = got.get(key, 0) + 1
    assert got == want
    # and by name: which Linear layers quantise, which stay in float (head in float32)
    from flax import nnx

    from model.layers import Linear
    for path, mod in nnx.iter_graph(model):
        if isinstance(mod, Linear):
            listed = path[-1] in FP8_LINEARS and path[-2] != "compressor"  # its wkv is float32
            assert (mod.quant == "fp8") == listed, path
    assert model.head.dtype == "float32"


def test_quantised_linear_is_the_matmul_of_the_rounded_operands():
    from flax import nnx

    from model import config
    from model.layers import Linear
    cfg = config.preset("tiny", quant_matmul="fp8", quant_block=16)
    lin = Linear((64, 2, 16), ("embed", "heads", "head_dim"), cfg, nnx.Rngs(3), fp8=True)
    x = np.asarray(jax.random.normal(jax.random.key(4), (5, 64)) * 3)
    w = np.asarray(lin.w[...])
    # per head a [64 in, 16 out] matrix in 16 x 16 tiles (DeepSeek's [heads * 16, 64] layout)
    wq = oracle_qdq(np.moveaxis(w, 1, 0), "e4m3", (16, 16))                 # [2, 64, 16]
    want = np.einsum("ni,hio->nho", oracle_qdq(x, "e4m3", 16).astype(np.float64), wq.astype(np.float64))
    got = np.asarray(lin(jnp.asarray(x), "ni,iho->nho"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- the real FP8 matmul (quant_matmul_impl = native) -----------------------------------------
NATIVE_CASES = [  # (spec, x shape, w shape, in_axis): the model's three kinds of fp8 Linear
    ("...i,io->...o", (3, 5, 64), (64, 48), 0),           # wq_a, wkv, shared experts, MTP
    ("bsq,qhk->bshk", (2, 3, 32), (32, 2, 48), 0),         # wq_b: heads are separate matrices
    ("bsgo,god->bsd", (2, 3, 2, 32), (2, 32, 64), 1),      # wo_b: one matrix per group, summed
]


def _rounded_weight(w, in_axis, block):
    return np.moveaxis(oracle_qdq(np.moveaxis(w, in_axis, -2), "e4m3", (block, block)), -2, in_axis)


@pytest.mark.parametrize("spec,xs,ws,in_axis", NATIVE_CASES, ids=["plain", "heads", "groups"])
def test_native_fp8_einsum_is_the_product_of_the_rounded_operands(spec, xs, ws, in_axis):
    """The e4m3 values multiplied per block and scaled afterwards = the float64 product of the
    operands rounded by the NumPy oracle; its gradient = the simulation's (straight-through)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(xs) * np.exp(rng.uniform(-3, 3, xs))).astype(np.float32)
    w = (rng.standard_normal(ws) * 0.05).astype(np.float32)
    w.reshape(-1)[:16] = 0.0   # an all-zero stretch: blocks whose scale comes from the floor
    want = np.einsum(spec, oracle_qdq(x, "e4m3", 16).astype(np.float64),
                     _rounded_weight(w, in_axis, 16).astype(np.float64))
    native = jax.jit(lambda a, b: quant.fp8_einsum(spec, a, b, 16, in_axis))
    got = np.asarray(native(x, w))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())

    def simulated(a, b):
        b = jnp.moveaxis(quant.qdq(jnp.moveaxis(b, in_axis, -2), "e4m3", (16, 16)), -2, in_axis)
        return jnp.einsum(spec, quant.qdq(a, "e4m3", 16), b)

    ct = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    g_native = jax.grad(lambda a, b: jnp.sum(native(a, b) * ct), (0, 1))(x, w)
    g_sim = jax.grad(lambda a, b: jnp.sum(simulated(a, b) * ct), (0, 1))(x, w)
    for a, b in zip(g_native, g_sim):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7 * float(jnp.abs(b).max()))


def test_native_fp8_model_equals_the_simulation():
    """tiny (one CSA layer and the MTP block) with fp8 matmuls in 16 x 16 tiles, float32: the
    native matmuls run at the 9 kinds of fp8 Linear and give the simulated model's logits and
    MTP logits to float32 rounding (gradients: per kind, above)."""
    from flax import nnx

    from model.layers import Linear
    cfg, sim = _tiny(quant_matmul="fp8", quant_block=16, dtype="float32", n_layers=1,
                     compress_ratios=(4,), n_hash_layers=0)
    native = _tiny(**{**cfg.to_dict(), "quant_matmul_impl": "native"})[1]
    nnx.update(native, nnx.state(sim))  # the same weights
    assert {p[-1] for p, m in nnx.iter_graph(native) if isinstance(m, Linear) and m.native} == FP8_LINEARS
    ids = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
    forward = jax.jit(lambda graphdef, state: nnx.merge(graphdef, state)(ids), static_argnums=0)
    (want, want_aux), (got, got_aux) = (forward(*nnx.split(m)) for m in (sim, native))
    for a, b in zip((got, *got_aux.mtp_logits), (want, *want_aux.mtp_logits)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.tpu_aot
@pytest.mark.skipif(not __import__("plan").libtpu_available(), reason="libtpu not installed")
def test_native_fp8_einsum_lowers_to_fp8_products_on_tpu7x(monkeypatch):
    """Compiled for a TPU v7 chip (libtpu on the CPU host): the matmul's operands stay e4m3."""
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc("tpu7x:2x2x1", "tpu").devices
    at = NamedSharding(jax.sharding.Mesh([devices[0]], ("x",)), PartitionSpec())
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=at)
    w = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=at)
    fn = jax.jit(lambda a, b: quant.fp8_einsum("...i,io->...o", a, b, 128, 0, jnp.bfloat16))
    with jax.default_matmul_precision("default"):
        hlo = fn.lower(x, w).compile().as_text()
    assert product_operand_types(hlo) == [("f8e4m3fn", "f8e4m3fn")]


def product_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of the operands of every matmul (dot / convolution) in compiled HLO."""
    import re

    types = dict(re.findall(r"(%[\w.-]+) = (\w+)\[", hlo))
    return [tuple(types[name] for name in re.findall(r"%[\w.-]+", operands))
            for operands in re.findall(r" (?:convolution|dot)\(([^)]*)\)", hlo)]


# --- weights held quantised (model/storage.py) -------------------------------------------------
def _quantised_elements(model):
    from flax import nnx

    from model.counts import weight_classes
    classes = weight_classes(model)
    return classes, {p: v.get_value().size for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                     if classes[tuple(p)] != "other"}


@pytest.mark.slow
def test_held_quantized_weights_compute_the_same_from_their_bytes():
    """hold_quantized replaces the fp8 projections' and the fp4 routed experts' float weights by
    codes + UE8M0 bytes (layers stacked for the scan included): the logits are the fake-quantised
    model's to the bit, and the bytes held are the planner's per-format formula
    (model.counts.storage_bytes, DeepSeek's fp8+fp4 release format) for exactly those weights."""
    from flax import nnx

    from model.counts import storage_bytes
    from model.layers import QuantScales, QuantValues
    from model.storage import held_bytes, hold_quantized
    cfg, model = _tiny(quant_matmul="fp8", quant_experts="fp4", quant_block=16, dtype="float32", **SMALL)
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    forward = jax.jit(lambda graphdef, state: nnx.merge(graphdef, state)(ids)[0], static_argnums=0)
    want = forward(*nnx.split(model))
    classes, quantised = _quantised_elements(model)
    before = held_bytes(model)
    held = hold_quantized(model)
    np.testing.assert_array_equal(forward(*nnx.split(model)), want)
    assert held["values"] + held["scales"] == storage_bytes(cfg, quantised, classes)["fp8+fp4"]
    assert held["other"] == before["other"] - 4 * sum(quantised.values())  # their float32 bytes gone
    assert not set(quantised) & {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {type(v) for _, v in nnx.to_flat_state(nnx.state(model))} >= {QuantValues, QuantScales}


def test_held_fp8_experts_are_the_fake_quantised_weights():
    """quant_experts=fp8: the experts held as e4m3 128-style tiles (16 x 16 here) dequantise to
    the fake-quantised weights bit for bit, in the planner's fp8 bytes."""
    from model.counts import storage_bytes
    from model.moe import MoE
    from model.storage import hold_quantized
    cfg, model = _tiny(quant_matmul="fp8", quant_experts="fp8", quant_block=16, **SMALL)
    moes = [m for _, m in __import__("flax").nnx.iter_graph(model) if isinstance(m, MoE)]
    want = [m.expert_weights() for m in moes]
    classes, quantised = _quantised_elements(model)
    held = hold_quantized(model)
    for m, ws in zip(moes, want):
        for a, b in zip(m.expert_weights(), ws):
            np.testing.assert_array_equal(a, b)
    assert held["values"] + held["scales"] == storage_bytes(cfg, quantised, classes)["fp8"]


def test_holding_an_unquantised_model_is_an_error():
    from model.storage import hold_quantized
    with pytest.raises(ConfigError, match="no weight is quantised; set model.quant_matmul=fp8"):
        hold_quantized(_tiny()[1])


def test_quant_config_errors_name_the_field():
    from model import config
    with pytest.raises(ConfigError, match="quant_block: 128 does not divide dim = 64"):
        config.preset("tiny", quant_matmul="fp8")
    with pytest.raises(ConfigError, match="quant_kv_block: 64 does not divide head_dim - rope_head_dim = 16"):
        config.preset("tiny", quant_kv="fp8")
    with pytest.raises(ConfigError, match="quant_experts: must be one of"):
        config.preset("tiny", quant_experts="int8")
    assert config.preset("v4-flash").quant_experts == "fp4" and config.preset("tiny").quant_matmul == "none"


def test_storage_bytes_by_format_from_hand_counts():
    import math

    from flax import nnx

    from model import abstract, param_counts, preset
    from model.counts import storage_bytes, weight_classes
    cfg = preset("tiny")
    model = abstract(cfg)
    classes = weight_classes(model)
    elements = {p: math.prod(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    c, blocks = cfg, cfg.n_layers + cfg.n_mtp_layers
    csa = sum(c.is_csa(r) for r in c.compress_ratios)
    experts = blocks * c.n_routed_experts * 3 * c.dim * c.moe_inter_dim
    matmul = (blocks * (c.dim * c.q_lora_rank + c.q_lora_rank * c.n_heads * c.head_dim + c.dim * c.head_dim
                        + c.o_groups * c.o_lora_rank * c.dim + 3 * c.dim * c.moe_inter_dim * c.n_shared_experts)
              + csa * c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.n_mtp_layers * 2 * c.dim * c.dim)
    total = param_counts(cfg)["total"]
    other = total - experts - matmul
    got = storage_bytes(cfg, elements, classes)
    tile = 1 + 1 / 128 ** 2
    assert got["bf16"] == pytest.approx(2 * total)
    assert got["fp8"] == pytest.approx(2 * other + tile * (matmul + experts))
    assert got["fp8+fp4"] == pytest.approx(2 * other + tile * matmul + (0.5 + 1 / 32) * experts)
