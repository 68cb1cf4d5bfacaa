"""`python -m plan`: the command line (exit codes: 0 fits, 1 does not fit, 2 a configuration /
topology error). plan/__init__.py says what the plan contains and how it is made."""
from __future__ import annotations

import argparse
import os
import sys

import plan as _package
from plan.hardware import PlanError, parse_topology
from plan.report import plan


def _parse_mesh(text: str):
    from parallel.mesh import MeshConfig

    try:
        given = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
        if -1 in given.values():  # axes not named are 1; data takes the rest unless another does
            given = {"data": 1, **given}
        return MeshConfig.from_dict(given)
    except ValueError as e:
        raise PlanError(f"--mesh {text}: expected auto or e.g. fsdp=-1,expert=16 ({e})") from e


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m plan", description=_package.__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="run configuration YAML")
    ap.add_argument("--topology", required=True,
                    help="v5p-1024, v6e-256, tpu7x-128 (accelerator types), v5p:4x4x8 (slice shape) or gpu:h200x64")
    ap.add_argument("--mesh", help="auto, or sizes like fsdp=-1,expert=16 (default: the config's mesh: "
                                   "section, else auto)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
    ap.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction, default=None,
                    help="ahead-of-time compile for a TPU topology (default: when libtpu is installed)")
    ap.add_argument("--dump", metavar="DIR", help="with the compile: write XLA's dump there (optimised HLO, "
                                                  "buffer assignment, memory-usage report: where the bytes go)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.global_batch=1024")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Exit codes: 0 fits, 1 does not fit, 2 a configuration / topology error."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # planning needs no accelerator
    from train.distributed import rare_full_gc

    rare_full_gc()  # the planner traces the full-depth model
    import yaml

    from model.config import ConfigError
    from train.config import load_run_config

    try:
        run_cfg = load_run_config(args.config, args.overrides)
        topo = parse_topology(args.topology)
        if args.mesh == "auto":
            mesh_cfg = None
        elif args.mesh:
            mesh_cfg = _parse_mesh(args.mesh)
        else:
            with open(args.config) as f:
                given = "mesh" in (yaml.safe_load(f) or {})
            given = given or any(o.startswith("mesh.") for o in args.overrides)
            mesh_cfg = run_cfg.mesh if given else None
        if not 0 < args.mfu <= 1:
            raise PlanError(f"--mfu must be in (0, 1], got {args.mfu}")
    except (ConfigError, PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return plan(run_cfg, topo, mesh_cfg, args.mfu, args.compile_, dump=args.dump)
