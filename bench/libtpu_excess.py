"""What libtpu reports beyond the buffer assignment it dumps, on small programs.

Usage: python bench/libtpu_excess.py [--topology v5p:2x2x2]

The pod compiles (python -m plan) report more temporaries than the preallocated-temp block of
the buffer assignment that libtpu dumps (`*after_optimizations-buffer-assignment.txt`): 0.9
GiB at 4 unlooped layers, 9.0 / 20.7 GiB on v4-flash-pod / v4-pro-pod (docs/benchmarks.md).
This compiles toy programs for one or 8 devices of a TPU slice on this host (libtpu from
`pip install -e '.[tpu]'`) and prints, per program, the compiled `temp_size_in_bytes`, the
dumped assignment's preallocated temporaries (default memory space) and their difference,
against the size of the program's activation [S, D] float32 per device. The dumped temporaries
count memory spaces 0 (HBM) and 1 (VMEM, 32-42 MiB here): libtpu's figure includes both. The programs: a stack
of L layers h + tanh(h @ w[l]) in a scan, a fori_loop or unrolled; forward only or its
gradient with each layer rematerialised; weights and rows replicated or split over 8 devices.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import tempfile

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

MiB = 2 ** 20


def program(n_layers: int, loop: str, grad: bool):
    """The layers' function of (w [L, D, D], x [S, D]): the last h (forward) or d sum(h^2) / dw."""
    def layer(h, w):
        return h + jnp.tanh(h.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32)

    def forward(ws, x):
        f = jax.checkpoint(layer) if grad else layer
        if loop == "scan":
            return jax.lax.scan(lambda h, w: (f(h, w), None), x, ws)[0]
        if loop == "fori":
            return jax.lax.fori_loop(0, n_layers, lambda i, h: f(h, ws[i]), x)
        h = x
        for i in range(n_layers):
            h = f(h, ws[i])
        return h

    return jax.grad(lambda ws, x: jnp.sum(forward(ws, x) ** 2)) if grad else forward


def measure(devices, n_layers: int, rows: int, dim: int, loop: str, grad: bool, split: bool):
    """(compiled temporaries, dumped preallocated temporaries in HBM and VMEM) in bytes per device."""
    mesh = Mesh(np.array(devices), ("d",))
    ws = jax.ShapeDtypeStruct((n_layers, dim, dim), jnp.float32, sharding=NamedSharding(mesh, P(None, "d" if split else None, None)))
    x = jax.ShapeDtypeStruct((rows, dim), jnp.float32, sharding=NamedSharding(mesh, P("d" if split else None, None)))
    with tempfile.TemporaryDirectory() as dump:
        compiled = jax.jit(program(n_layers, loop, grad)).lower(ws, x).compile(
            compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
        text = open(glob.glob(os.path.join(dump, "*after_optimizations-buffer-assignment.txt"))[0]).read()
    # memory space 0 (HBM) and 1 (VMEM): libtpu's figure includes both
    dumped = sum(int(m) for m in re.findall(r"^allocation \d+: size (\d+), (?:color 1, )?preallocated-temp:", text, re.M))
    return compiled.memory_analysis().temp_size_in_bytes, dumped


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:2x2x2", help="a TPU slice of 8 chips")
    args = ap.parse_args()
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(args.topology, "tpu").devices
    print(f"libtpu compiles for {args.topology} ({devices[0].device_kind}); MiB per device\n")
    print("| program | devices | L | rows x D | activation f32 | compiled temps | dumped temps | compiled - dumped |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [(1, L, 8192, 1024, loop, grad, False) for grad in (False, True) for loop, L in
             (("unrolled", 4), ("scan", 4), ("scan", 16))]
    cases += [(8, L, 65536, 1024, loop, False, True) for loop, L in (("unrolled", 4), ("scan", 2), ("scan", 4), ("scan", 16))]
    cases += [(8, 4, 131072, 1024, "scan", False, True), (8, 4, 65536, 1024, "scan", True, True)]
    for n_dev, n_layers, rows, dim, loop, grad, split in cases:
        temp, dumped = measure(devices[:n_dev], n_layers, rows, dim, loop, grad, split)
        act = rows // (n_dev if split else 1) * dim * 4
        name = f"{loop}, {'gradient (remat)' if grad else 'forward'}{', w and rows split' if split else ''}"
        print(f"| {name} | {n_dev} | {n_layers} | {rows} x {dim} | {act / MiB:.0f} | {temp / MiB:.1f} | "
              f"{dumped / MiB:.1f} | {(temp - dumped) / MiB:.1f} |", flush=True)


if __name__ == "__main__":
    main()
