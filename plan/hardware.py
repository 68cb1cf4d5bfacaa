"""The hardware a plan is for: the chip catalogue (plan/chips.yaml) and slice topologies.

`v5p-1024` (Google's accelerator type), `v5p:8x8x8` (a slice shape) and `gpu:h200x64` all
become a `Topology`: a chip family, its count, and the torus shape libtpu knows the slice by.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

GiB = 2 ** 30
MiB = 2 ** 20
CATALOGUE = Path(__file__).with_name("chips.yaml")


class PlanError(ValueError):
    """A topology, mesh or config the planner cannot use; the message says why."""


@dataclass(frozen=True)
class Chip:
    kind: str
    hbm: float             # bytes per JAX device
    peak: float            # dense bf16 FLOP/s per JAX device
    devices_per_chip: int  # JAX devices per chip (TPU7x: one per TensorCore)
    units_per_chip: int    # what N in "family-N" counts per chip (TensorCores on v4 / v5p / TPU7x)
    torus: int             # torus dimensions of a TPU slice; 0 for GPUs
    chips_per_host: int    # chips one host (one JAX process) drives


_HBM_UNITS = {"hbm_gib": GiB, "hbm_mib": MiB}
_FIELDS = ("kind", "peak_tflops", "devices_per_chip", "units_per_chip", "torus", "chips_per_host")


def load_chips(path=CATALOGUE) -> dict[str, Chip]:
    """{family: Chip} from a catalogue like plan/chips.yaml: HBM (hbm_gib or hbm_mib) converted
    to bytes, the peak (peak_tflops) to FLOP/s."""
    with open(path) as f:
        entries = yaml.safe_load(f) or {}
    chips = {}
    for family, e in entries.items():
        hbm = [k for k in _HBM_UNITS if k in e]
        missing = [k for k in _FIELDS if k not in e]
        unknown = sorted(set(e) - set(_FIELDS) - set(_HBM_UNITS))
        if len(hbm) != 1 or missing or unknown:
            why = (([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
                   + ([f"give exactly one of hbm_gib / hbm_mib, not {hbm}"] if len(hbm) != 1 else []))
            raise PlanError(f"{path}: chip {family!r}: {'; '.join(why)}")
        chips[family] = Chip(str(e["kind"]), e[hbm[0]] * _HBM_UNITS[hbm[0]], e["peak_tflops"] * 1e12,
                             int(e["devices_per_chip"]), int(e["units_per_chip"]), int(e["torus"]),
                             int(e["chips_per_host"]))
    return chips


CHIPS = load_chips()


@dataclass(frozen=True)
class Topology:
    name: str
    family: str
    chips: int
    shape: tuple[int, ...]  # chips per torus dimension (TPU); () for GPUs

    @property
    def chip(self) -> Chip:
        return CHIPS[self.family]

    @property
    def devices(self) -> int:
        return self.chips * self.chip.devices_per_chip

    @property
    def devices_per_host(self) -> int:
        """JAX devices one process drives (a single host may hold fewer than a full host's chips)."""
        return min(self.chips, self.chip.chips_per_host) * self.chip.devices_per_chip

    @property
    def platform(self) -> str:
        return "tpu" if self.shape else "gpu"

    @property
    def tpu_name(self) -> str | None:
        """The name jax.experimental.topologies knows this slice by, e.g. `v5p:8x8x8`."""
        return f"{self.family}:{'x'.join(map(str, self.shape))}" if self.shape else None

    def describe(self) -> str:
        c = self.chip
        where = f"{self.chips} chips ({'x'.join(map(str, self.shape))})" if self.shape else f"{self.chips} GPUs"
        return (f"{self.name} = {where}, {self.devices} JAX devices of {c.hbm / GiB:.1f} GiB HBM "
                f"and {c.peak / 1e12:.0f} TFLOP/s bf16 each ({c.kind})")


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Google's slice shape for a power-of-two chip count: 4 -> 2x2x1, 64 -> 4x4x4,
    128 -> 4x4x8, 256 (2-D) -> 16x16."""
    if chips < 1 or chips & (chips - 1):
        raise PlanError(f"{chips} chips is not a power of two; name the slice shape instead, "
                        "e.g. v5p:4x4x12")
    shape = [1] * dims
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    return tuple(sorted(s for s in shape if s > 1)) + (1,) * shape.count(1)


def parse_topology(text: str) -> Topology:
    """`v5p-1024` (the accelerator type: v4 / v5p / TPU7x count TensorCores, v5e / v6e chips),
    `v5p:8x8x8` (a slice shape in chips), or `gpu:h200x64`."""
    m = re.fullmatch(r"gpu:(\w+?)x(\d+)", text)
    if m:
        family, n = m.group(1), int(m.group(2))
        if family not in CHIPS or CHIPS[family].torus:
            gpus = [k for k, c in CHIPS.items() if not c.torus]
            raise PlanError(f"--topology {text}: unknown GPU {family!r}; known: {gpus}")
        return Topology(text, family, n, ())
    m = re.fullmatch(r"(\w+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    if not m or m.group(1) not in CHIPS or not CHIPS[m.group(1)].torus:
        tpus = [k for k, c in CHIPS.items() if c.torus]
        raise PlanError(f"--topology {text}: expected FAMILY-N (e.g. v5p-1024, v6e-256, tpu7x-128), "
                        f"FAMILY:AxBxC or gpu:h200x64; TPU families: {tpus}")
    family, chip = m.group(1), CHIPS[m.group(1)]
    if m.group(3):
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != chip.torus:
            raise PlanError(f"--topology {text}: {family} slices have {chip.torus} dimensions")
        return Topology(text, family, math.prod(shape), shape)
    units = int(m.group(2))
    if units % chip.units_per_chip:
        raise PlanError(f"--topology {text}: {family}-N counts TensorCores, {chip.units_per_chip} per chip")
    chips = units // chip.units_per_chip
    return Topology(text, family, chips, torus_shape(chips, chip.torus))
