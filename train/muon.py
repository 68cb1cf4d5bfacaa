"""Muon whose Newton-Schulz runs on whole matrices each device owns (no gathered weights).

Legend: b matrices (the batch axes: stacked layers, experts, groups), m x n one matrix.
The update is optax.contrib.muon's (Nesterov momentum with bias correction, Frobenius
normalisation, Newton-Schulz with the given coefficients, update RMS rescaled to
`consistent_rms` * sqrt(max(fan_in, fan_out))), with the same state (optax's MuonState), and
it is tested equal to it. What differs is where the Newton-Schulz products run.

Why: a parameter's matrix dimensions are sharded (over fsdp, tensor), so the products X X^T
of a plain implementation make the partitioner gather every matrix on every device that holds
a piece of it, for every stacked layer at once: on v4-flash (fsdp=32 x expert=16) about 2 GiB
of gathered float32 experts per layer, live together (the compiler's 147 GB), and each device
repeating its fsdp group's work. Here, inside `jax.shard_map`, each device's pieces are
exchanged with `all_to_all` over the axes sharding the matrix dimensions: the device gives away
its slice of every matrix but 1/k of them and receives the rest of those, so it holds whole
matrices, 1/k of its group's; it orthogonalises them and the inverse exchange puts the slices
back. Memory per device: its share of the parameter, once; compute: its share of the matrices.
Mesh axes the parameter is replicated over (data; expert for the non-expert weights) share the
work of each matrix of at least SHARE_MIN elements: every replica takes 1/r of the long
dimension (n, columns), the m x m products X X^T (and the Frobenius norm) are summed over the
replicas (`psum`), each computes 1/r of the rows of A A (all_gather of the m x m result), and
an all_gather puts the columns back: each replica does 1/r of the FLOPs. (There are fewer non-expert matrices
than devices, 29 per stacked layer group against 2048 devices on v4-pro-pod: splitting whole
matrices cannot spread them; every expert-axis replica running every one made the compiled
step do 4.2x Muon's FLOPs there.)
Batches that do not divide are padded with zero matrices (which stay zero). On a mesh, the
small matrices of equal shape and sharding (several parameters) are stacked and go through
one exchange and one Newton-Schulz loop together (`_groups`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers, MuonState


def newton_schulz(x_bmn, coeffs, eps: float, column_axes: tuple = (), r: int = 1):
    """Orthogonalise each matrix of x [b, m, n] (rows <= columns after an optional transpose).
    With `column_axes` (inside shard_map; r devices along them), x holds this device's slice of
    the columns of matrices whose other slices are on those devices (m <= n already): X X^T is
    summed over them, and when r divides m each computes 1/r of the rows of A A."""
    tall = not column_axes and x_bmn.shape[1] > x_bmn.shape[2]
    x = jnp.swapaxes(x_bmn, 1, 2) if tall else x_bmn
    total = (lambda v: jax.lax.psum(v, column_axes)) if column_axes else (lambda v: v)  # noqa: E731
    norm = jnp.sqrt(total(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2), keepdims=True)))
    x = (x / (norm + eps)).astype(x_bmn.dtype)  # the norm in float32 whatever x's dtype
    rows = x.shape[1] // r if column_axes and x.shape[1] % r == 0 else 0

    def step(x, c):
        a = total(jnp.einsum("bij,bkj->bik", x, x))
        if rows:  # this device's rows of c1 A + c2 A A, then all of them
            mine = jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(column_axes) * rows, rows, 1)
            b = jax.lax.all_gather(c[1] * mine + c[2] * jnp.einsum("bij,bjk->bik", mine, a), column_axes,
                                   axis=1, tiled=True)
        else:
            b = c[1] * a + c[2] * jnp.einsum("bij,bjk->bik", a, a)
        return c[0] * x + jnp.einsum("bij,bjk->bik", b, x), None

    if column_axes:
        # unrolled: with the psum / all_gather inside the scan (itself inside the bad-step
        # lax.cond), a 2-process CPU run hung when one process loaded the step from the
        # compilation cache and the other compiled it (tests/test_multihost.py resume)
        for i in range(coeffs.shape[0]):
            x, _ = step(x, coeffs[i].astype(x.dtype))
    else:
        x, _ = jax.lax.scan(step, x, coeffs.astype(x.dtype))
    return jnp.swapaxes(x, 1, 2) if tall else x


def _tuple(a) -> tuple:
    return (a,) if isinstance(a, int) else tuple(a)


def _axes(dims: MuonDimensionNumbers, ndim: int):
    red = tuple(a % ndim for a in _tuple(dims.reduction_axis))
    out = tuple(a % ndim for a in _tuple(dims.output_axis))
    batch = tuple(a for a in range(ndim) if a not in red + out)
    return batch, red, out


SHARE_MIN = 1 << 20  # elements of a matrix below which replicas repeat its Newton-Schulz


def orthogonalize(x, dims: MuonDimensionNumbers, coeffs, eps: float, spec: P | None = None, mesh=None,
                  share_min: int = SHARE_MIN):
    """Newton-Schulz of every matrix of x (axes per `dims`); with a mesh and x's PartitionSpec,
    on whole matrices exchanged within the mesh, shared by the replicas when a matrix has at
    least `share_min` elements (module docstring; below that the collectives cost more than the
    FLOPs they save, and each unrolled shared iteration adds compile time)."""
    batch, red, out = _axes(dims, x.ndim)
    entries = tuple(spec) + (None,) * (x.ndim - len(spec)) if spec is not None else (None,) * x.ndim
    as_tuple = lambda e: () if e is None else (e if isinstance(e, tuple) else (e,))  # noqa: E731
    mat_axes = [as_tuple(entries[i]) for i in red + out]  # mesh axes of each matrix dim, major first
    used = {a for e in entries for a in as_tuple(e)}
    big = math.prod(x.shape[i] for i in red + out) >= share_min
    free = tuple(a for a in (mesh.axis_names if mesh is not None else ()) if a not in used and mesh.shape[a] > 1)
    stacked = math.prod(x.shape[i] for i in batch) > 1
    replicas = free if big else ()
    split = free if stacked and not big else ()  # small stacked matrices: the replicas split the stack
    local = lambda xb: _whole_matrices(xb, batch, red, out, coeffs, eps, mat_axes, replicas, split, mesh)  # noqa: E731
    if mesh is None or not (any(mat_axes) or replicas or split):
        return local(x)
    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(x)


def _whole_matrices(x, batch, red, out, coeffs, eps, mat_axes, replicas, split, mesh):
    """x's (local) matrices -> [b, matrix dims...]; all_to_all over each mesh axis sharding a
    matrix dim (splitting b, completing that dim); Newton-Schulz, each of the `replicas` taking
    1/r of every matrix's long dimension, or each device along `split` 1/r of the matrices; the
    inverse exchanges."""
    perm = batch + red + out
    xt = x.transpose(perm)
    batch_shape = xt.shape[:len(batch)]
    xt = xt.reshape((-1,) + xt.shape[len(batch):])
    b = xt.shape[0]
    ways = math.prod(mesh.shape[a] for axes in mat_axes for a in axes) if mesh is not None else 1
    if b % ways:
        xt = jnp.concatenate([xt, jnp.zeros((ways - b % ways,) + xt.shape[1:], xt.dtype)])
    moves = [(1 + j, a) for j, axes in enumerate(mat_axes) for a in reversed(axes)] if mesh is not None else []
    for dim, a in moves:  # a dim split over (major, minor) is completed minor first
        xt = jax.lax.all_to_all(xt, a, 0, dim, tiled=True)
    m = math.prod(xt.shape[1:1 + len(red)])
    y = xt.reshape(xt.shape[0], m, -1)
    if replicas:
        y = _columns_shared(y, coeffs, eps, replicas, mesh)
    elif split:
        y = _stack_shared(y, coeffs, eps, split, mesh)
    else:
        y = newton_schulz(y, coeffs, eps)
    y = y.reshape(xt.shape)
    for dim, a in reversed(moves):
        y = jax.lax.all_to_all(y, a, dim, 0, tiled=True)
    return y[:b].reshape(batch_shape + y.shape[1:]).transpose(tuple(perm.index(i) for i in range(x.ndim)))


def _own_part(x, axis: int, axes, mesh):
    """(this device's 1/r of x along `axis`, zero-padded to a multiple of the r devices along
    `axes`; r; x's length there)."""
    r, n = math.prod(mesh.shape[a] for a in axes), x.shape[axis]
    if n % r:
        x = jnp.pad(x, [(0, r - n % r if i == axis else 0) for i in range(x.ndim)])
    part = x.shape[axis] // r
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axes) * part, part, axis), r, n


def _columns_shared(x, coeffs, eps, replicas, mesh):
    """Newton-Schulz of the matrices x [b, m, n] that every device along `replicas` holds: each
    takes 1/r of the long dimension (zero-padded: zero columns stay zero), X X^T is summed over
    them, and the slices are gathered back."""
    tall = x.shape[1] > x.shape[2]
    x = jnp.swapaxes(x, 1, 2) if tall else x
    mine, r, n = _own_part(x, 2, replicas, mesh)
    y = jax.lax.all_gather(newton_schulz(mine, coeffs, eps, replicas, r), replicas, axis=2, tiled=True)[:, :, :n]
    return jnp.swapaxes(y, 1, 2) if tall else y


def _stack_shared(x, coeffs, eps, axes, mesh):
    """Newton-Schulz of the matrices x [b, m, n] that every device along `axes` holds: each
    orthogonalises 1/r of them (zero matrices pad b; they stay zero) and an all_gather returns
    all of them to every device."""
    mine, _, b = _own_part(x, 0, axes, mesh)
    return jax.lax.all_gather(newton_schulz(mine, coeffs, eps), axes, axis=0, tiled=True)[:b]


def _groups(dims, specs, xs, mesh) -> list:
    """[(dims, spec, leaf indices)] of the Muon leaves (`dims` not None). On a mesh, leaves whose
    matrices have fewer than SHARE_MIN elements and equal shape, dtype, dimension numbers and
    sharding share one group, orthogonalised stacked: one set of exchanges and one Newton-Schulz
    loop for all of them (each small one alone is mostly collectives' fixed cost; the Muon update
    of tiny on fsdp=8 emulated CPU devices: 120.6 -> 69.1 ms). Any other leaf is a group of its
    own (on one device the stacking copies cost more than they save: 20.3 -> 21.6 ms)."""
    out = {}
    for i, (d, spec, x) in enumerate(zip(dims, specs, xs)):
        if d is None:
            continue
        _, red, cols = _axes(d, x.ndim)
        small = mesh is not None and math.prod(x.shape[a] for a in red + cols) < SHARE_MIN
        out.setdefault((d, spec, x.shape, x.dtype) if small else i, (d, spec, []))[2].append(i)
    return list(out.values())


def scale_by_muon(dims, coeffs, beta: float, consistent_rms: float, eps: float = 1e-8,
                  specs=None, mesh=None, dtype: str | None = None) -> optax.GradientTransformation:
    """Muon's direction for the leaves with MuonDimensionNumbers in `dims` (a tree like the
    updates): Nesterov momentum, orthogonalisation, RMS rescaling. `specs`: the leaves'
    PartitionSpecs on `mesh` (None: unsharded). `dtype`: of the orthogonalisation (None: the
    updates'); the direction comes back in the updates' dtype."""
    coeffs = jnp.asarray(coeffs, jnp.float32)
    is_dims = lambda d: isinstance(d, MuonDimensionNumbers)  # noqa: E731

    def init(params):
        return MuonState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params), ns_coeffs=coeffs)

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                              optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                              optax.tree.bias_correction(updates, beta, count))
        spec_tree = specs if specs is not None else jax.tree.map(lambda _: None, dims, is_leaf=is_dims)

        def direction(x, d, spec):
            _, red, cols = _axes(d, x.ndim)
            fan_in, fan_out = (math.prod(x.shape[a] for a in axes) for axes in (red, cols))
            y = orthogonalize(x.astype(dtype or x.dtype), d, state.ns_coeffs, eps, spec, mesh).astype(x.dtype)
            return y * (math.sqrt(max(fan_in, fan_out)) * consistent_rms)

        flat_dims, treedef = jax.tree.flatten(dims, is_leaf=lambda d: d is None or is_dims(d))
        out = treedef.flatten_up_to(mu_hat)  # AdamW leaves (None: masked out by optax.partition) as they are
        for d, spec, idx in _groups(flat_dims, treedef.flatten_up_to(spec_tree), out, mesh):
            if len(idx) == 1:
                out[idx[0]] = direction(out[idx[0]], d, spec)
                continue
            # stacked on a new leading batch axis: the matrix axes move one up
            shifted = MuonDimensionNumbers(*(tuple(a + 1 if a >= 0 else a for a in _tuple(axes))
                                             for axes in (d.reduction_axis, d.output_axis)))
            o = direction(jnp.stack([out[i] for i in idx]), shifted, None if spec is None else P(None, *spec))
            for k, i in enumerate(idx):
                out[i] = o[k]
        return treedef.unflatten(out), MuonState(count=count, mu=mu, ns_coeffs=state.ns_coeffs)

    return optax.GradientTransformation(init, update)


def newton_schulz_flops(shape, dims: MuonDimensionNumbers, steps: int) -> float:
    """Matmul FLOPs of orthogonalising an array of `shape`: per matrix (m <= n after the
    transpose) and step, X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n)."""
    batch, red, out = _axes(dims, len(shape))
    b, m, n = (math.prod(shape[a] for a in axes) for axes in (batch, red, out))
    m, n = min(m, n), max(m, n)
    return float(b * steps * (4 * m * m * n + 2 * m ** 3))
