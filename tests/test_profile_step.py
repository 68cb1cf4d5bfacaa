"""bench/profile_step.py: a traced step's op time attributed to the source lines that made it."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("profile_step", ROOT / "bench/profile_step.py")
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


def _loss(w, x):
    h = jnp.einsum("nd,df->nf", x, w)  # the product: its forward and its two transposed products
    return jnp.sum(jnp.tanh(h))


DOT_LINE = _loss.__code__.co_firstlineno + 1


def test_op_time_lands_on_the_lines_that_made_it(tmp_path):
    """A jitted gradient of a [256, 256] x [256, 256] product is traced for 3 calls; the einsum's
    line gets the dots (forward and backward, its backward counted as such), the tanh line the
    elementwise work, and the ops of a line are found under its file:line key."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((256, 256), np.float32))
    x = jnp.asarray(rng.standard_normal((256, 256), np.float32))
    compiled = jax.jit(jax.grad(_loss)).lower(w, x).compile()
    sources = profile_step.instruction_sources(compiled.as_text(), root=str(ROOT))
    here = str(pathlib.Path(__file__).relative_to(ROOT))
    dot_ops = [n for n, (f, _, line, _, kind) in sources.items() if f == here and line == DOT_LINE and kind == "dot"]
    assert len(dot_ops) >= 2  # the forward product and the weight gradient's
    assert {sources[n][1] for n in dot_ops} == {"_loss"}

    compiled(w, x).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(3):
        compiled(w, x).block_until_ready()
    jax.profiler.stop_trace()
    us, count = profile_step.op_times(str(tmp_path), sources)
    assert set(us) <= set(sources) and all(count[n] % 3 == 0 for n in count)
    rows = profile_step.by_source(us, sources, "line", steps=3)
    keys = [r[0] for r in rows]
    key, ms, bwd, kinds = rows[keys.index(f"{here}:{DOT_LINE}")]
    assert ms > 0 and 0 < bwd < ms and set(kinds) == {"dot"}
    assert abs(sum(r[1] for r in rows) - sum(us.values()) / 1000 / 3) < 1e-9
    by_op = profile_step.by_source(us, sources, "op", steps=3)
    assert {r[0] for r in by_op} == set(us)
