"""What a run starts from: `setup` builds the train state (freshly initialised into its shards,
read from train.init_from, or the abstract target a resume restores into) and the step
function; `restore_run` gives the model of a run directory's newest good checkpoint (for the
tools: python -m infer, model.export); `check_same_architecture` compares a checkpoint's model
config with the run's. Used by train/main.py, the benchmarks and the tests."""
from __future__ import annotations


def setup(cfg, mesh, rules, pretrained: bool = False, abstract: bool = False):
    """(train state on `mesh`, its shardings, the un-jitted step function) for a RunConfig:
    the model initialised into its shards (or, with `pretrained`, read from
    train.init_from), the optimiser state beside it. With `abstract`, the state is
    ShapeDtypeStructs with those shardings (a restore target: no memory, no initialiser)."""
    import jax
    from flax import nnx

    from parallel import abstract_sharded, create_sharded
    from parallel.mesh import platform_of
    from train.optim import make_optimizer, schedule
    from train.state import abstract_state, init_state, place_state
    from train.step import make_train_step

    if abstract:
        model = abstract_sharded(cfg.model, mesh, rules)
    elif pretrained:
        from model.pretrained import load_pretrained, pretrained_config

        path = cfg.train.init_from
        check_same_architecture(pretrained_config(path), cfg.model, "train.init_from")
        model = load_pretrained(path, mesh, rules, **cfg.model.to_dict())
    else:
        model = create_sharded(cfg.model, mesh, rules, seed=cfg.train.seed)
    tx = make_optimizer(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param), mesh, rules)
    if abstract:
        graphdef, state = abstract_state(model, tx, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, state)
    else:
        graphdef, state = init_state(model, tx, mesh)
        state, shardings = place_state(state, mesh)
    step_fn = make_train_step(graphdef, tx, cfg, schedule(cfg.optim, cfg.train.steps),
                              platform=platform_of(mesh))
    return state, shardings, step_fn


def restore_run(run_dir, overrides=()):
    """(model holding the newest good checkpoint's parameters, the run's RunConfig with
    `overrides`, the checkpoint's step) of a training run directory (its config.yaml and
    checkpoints). Restored onto one device: Orbax reshards whatever mesh the run used."""
    from pathlib import Path

    import jax
    from flax import nnx

    from model import abstract as abstract_model
    from parallel import MeshConfig, Rules, make_mesh
    from train.checkpoint import Checkpointer
    from train.config import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; give the log.run_dir of a training run")
    cfg = load_run_config(str(run_dir / "config.yaml"), list(overrides) + [
        "mesh.data=1", "mesh.fsdp=1", "mesh.expert=1", "mesh.tensor=1", "train.init_from=null"])
    mesh = make_mesh(MeshConfig(data=1), cfg.model, devices=jax.devices()[:1],
                     global_batch=cfg.data.global_batch)
    target, _, _ = setup(cfg, mesh, Rules.of_run(cfg), abstract=True)  # what training saves
    ckpt = Checkpointer(cfg.checkpoint.dir or str(run_dir / "checkpoints"), cfg.checkpoint, log=print)
    try:
        found = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if found is None:
        raise FileNotFoundError(f"{run_dir}: the run has no checkpoint yet")
    step, state, _ = found
    graphdef, params, rest = nnx.split(abstract_model(cfg.model), nnx.Param, ...)
    nnx.replace_by_pure_dict(params, state.params)
    nnx.replace_by_pure_dict(rest, state.rest)
    return nnx.merge(graphdef, params, rest), cfg, step


def check_same_architecture(ckpt, run, field: str) -> None:
    """ConfigError listing every architectural field (not a RUN_FIELDS one) where the
    checkpoint's config differs from the run's model config."""
    import dataclasses

    from model.config import RUN_FIELDS, ConfigError

    diff = [f"{f.name} (checkpoint {getattr(ckpt, f.name)!r}, run {getattr(run, f.name)!r})"
            for f in dataclasses.fields(run)
            if f.name not in RUN_FIELDS and getattr(ckpt, f.name) != getattr(run, f.name)]
    if diff:
        raise ConfigError(f"{field}: the checkpoint's model differs from model.* in {', '.join(diff)}; "
                          f"set those model fields to the checkpoint's values")
