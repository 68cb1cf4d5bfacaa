"""Checkpoints that never lose a run: one Orbax CheckpointManager behind a small class.

A checkpoint of step N holds three items, committed together (Orbax writes a step into a
temporary directory and renames it when every item is written, so a step directory is either
complete or not listed; a kill at any moment leaves at worst a temporary directory that is
ignored and cleaned up):
  state  the train state {step, params, rest (routing biases, hash tables), opt, bad, skipped}
  data   the Grain iterator's JSON state: the position in the data order
  meta   format tag, step, the resolved run config, every leaf's path / shape / dtype /
         fingerprint, and the SHA-256 of the data item
The train step draws no random numbers (V4 has no dropout; initialisation uses train.seed and
the data order lives in the iterator state), so state + data fix the rest of the run bit for bit.

Integrity. Orbax restores whatever bytes it finds. `fingerprints` hashes the bits of every leaf
on its devices (two wrapping uint32 sums weighted by element position: exact integer
arithmetic, so the value does not depend on sharding or reduction order; any single changed
element always changes it). Restore recomputes them on the restored arrays; a mismatch, an
unreadable file or foreign metadata marks the step corrupt: it is moved to `<dir>.corrupt/`
with a one-line reason and the next older step is tried.

Failure surfaces. A failed background write raises `CheckpointError` at the next save or at
`close()`; a save that Orbax reports as finished but did not commit is detected by listing the
committed steps afterwards (Orbax only logs some finalisation failures).

Only this module imports Orbax (tested with orbax-checkpoint 0.12.x; pyproject pins the range).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

FORMAT = "deepflax-checkpoint/1"
ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
    """A save or restore failed; the message names the step (and leaf) and what to do."""


class CorruptCheckpoint(CheckpointError):
    """This step cannot be trusted; an older one may still be good."""


class ModelMismatch(CheckpointError):
    """The checkpoint belongs to another model or optimiser: no step of it will fit."""


# --- fingerprints ---------------------------------------------------------------------------
def _words(x):
    """The bits of `x` as uint32 words (one per element; 64-bit elements give two)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]).astype(jnp.uint32)


def _leaf_fingerprint(x):
    w = _words(x)
    idx, stride = jnp.zeros(w.shape, jnp.uint32), 1
    for d in reversed(range(w.ndim)):  # row-major position, wrapping mod 2**32 (no 2**32 limit)
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    h1 = jnp.sum(w * (2 * idx + 1), dtype=jnp.uint32)  # odd weights: one changed word always shows
    h2 = jnp.sum((w ^ (w >> 13)) * (idx * jnp.uint32(0x9E3779B1) | 1), dtype=jnp.uint32)
    return jnp.stack([h1, h2])


@jax.jit
def _fingerprint_all(leaves):
    return jnp.stack([_leaf_fingerprint(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def leaf_paths(tree) -> list[str]:
    """'params/layers/0/attn/wq'-style names of a pytree's leaves, in flattening order."""
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return ["/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def fingerprints(tree) -> dict[str, str]:
    """{leaf path: 16 hex digits}, computed where the leaves live."""
    out = _fingerprint_all(jax.tree.leaves(tree))
    if not out.is_fully_addressable:  # several processes: gather the (tiny) result
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    values = np.asarray(jax.device_get(out))
    return {p: f"{int(a):08x}{int(b):08x}" for p, (a, b) in zip(leaf_paths(tree), values)}


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 400 else f"{text[:200]} ... {text[-200:]}"  # keep the OS reason


# --- the manager ----------------------------------------------------------------------------
_REPLICA_SLICE_MIN_BYTES = 4 << 20


def _register_array_handler() -> None:
    """Orbax splits the write of a replicated array across its replicas by slicing it on device,
    one small compiled program per shape: 13 s before the first save of the tiny model on CPU.
    Only arrays whose per-replica slice reaches 4 MiB are split (those are the writes where it
    pays); the first save then takes 0.3 s."""
    if getattr(_register_array_handler, "done", False):
        return
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_REPLICA_SLICE_MIN_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    _register_array_handler.done = True


class Checkpointer:
    """Save / verify / restore train state + data position + metadata under `directory`.

    `cfg` is a train.config.CheckpointConfig; `run_config` (a plain dict) is recorded in each
    checkpoint so a mismatch can say which setting differs.
    """

    def __init__(self, directory: str, cfg, run_config: dict | None = None,
                 log: Callable[[str], None] = print):
        directory = str(directory)  # Orbax needs absolute local paths (gs:// and the like are)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.cfg, self.run_config, self.log = cfg, run_config or {}, log
        _register_array_handler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True, create=True)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except Exception as e:  # noqa: BLE001 - Orbax raises several OS/permission types
            raise CheckpointError(f"checkpoint.dir {self.directory}: cannot be used: {_first_line(e)}") from e
        self._pending: int | None = None
        self._last_save = time.monotonic()
        self._probe()

    def _probe(self) -> None:
        """Write and delete a small file: a read-only or full directory fails here, at once and
        in the caller's thread (Orbax would find it in a background thread and wait for its
        coordination timeout, 5 minutes, before reporting)."""
        probe = epath.Path(self.directory) / f".write-probe-{jax.process_index()}-{os.getpid()}"
        try:
            probe.write_text("ok")
            probe.unlink()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint.dir {self.directory} is not writable: {_first_line(e)}") from e

    # saving
    def due(self, step: int) -> bool:
        """Whether the interval settings ask for a save after `step` steps."""
        by_steps = self.cfg.interval_steps and step % self.cfg.interval_steps == 0
        by_time = self.cfg.interval_minutes and time.monotonic() - self._last_save >= 60 * self.cfg.interval_minutes
        if self.cfg.interval_minutes and jax.process_count() > 1:  # clocks differ: process 0 decides
            from jax.experimental import multihost_utils

            by_time = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(by_time))))
        return bool(by_steps or by_time)

    def save(self, step: int, state, data_state: dict) -> None:
        """Start saving `state` (device arrays) and `data_state` as step `step`. Asynchronous
        by default: returns once the arrays are copied off the devices. Raises CheckpointError
        for this or an earlier save that failed."""
        self._finish_pending()
        self._probe()
        meta = {"format": FORMAT, "step": step, "time": time.time(), "config": self.run_config,
                "data_sha256": _sha256(data_state),
                "leaves": {p: {"shape": list(np.shape(x)), "dtype": str(x.dtype), "fingerprint": f}
                           for (p, f), x in zip(fingerprints(state).items(), jax.tree.leaves(state))}}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        try:
            self._mngr.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {_first_line(e)}") from e
        self._pending, self._last_save = step, time.monotonic()
        if not self.cfg.async_save:
            self._finish_pending()

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
            self._mngr.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"background save of step {step} to {self.directory} failed: "
                                  f"{_first_line(e)}") from e
        if step not in self.steps():
            raise CheckpointError(f"save of step {step} to {self.directory} did not commit (see the "
                                  f"log above); committed steps: {self.steps()}")

    def close(self) -> None:
        """Wait for the last save and check it committed; then release Orbax's threads."""
        try:
            self._finish_pending()
        finally:
            self._mngr.close()

    # restoring
    def steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def restore_latest(self, target) -> tuple[int, Any, dict] | None:
        """(step, state, data state) of the newest step that verifies, or None if there is no
        checkpoint. Corrupt steps are reported, moved aside and skipped; ModelMismatch is raised
        (no step of another model fits). `target`: arrays or ShapeDtypeStructs with shardings,
        on any mesh: Orbax reshards to it."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                state, data = self.restore(step, target)
                return step, state, data
            except CorruptCheckpoint as e:
                moved = self._quarantine(step)
                self.log(f"checkpoint: {e}; moved to {moved}; falling back to an older step")
        if steps:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: steps {steps} all failed "
                                  f"verification (moved to {self.directory}.corrupt)")
        return None

    def read_meta(self, step: int) -> dict:
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"step {step}: metadata unreadable ({_first_line(e)})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("step") != step \
                or not isinstance(meta.get("leaves"), dict):
            raise CorruptCheckpoint(f"step {step}: metadata is not a {FORMAT} record for this step")
        return meta

    def restore(self, step: int, target) -> tuple[Any, dict]:
        meta = self.read_meta(step)
        self._check_fits(step, meta, target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract(target)), data=ocp.args.JsonRestore())
        try:
            out = self._mngr.restore(step, args=args)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"step {step}: reading failed ({_first_line(e)})") from e
        state, data = out["state"], out["data"]
        if _sha256(data) != meta["data_sha256"]:
            raise CorruptCheckpoint(f"step {step}: data iterator state does not match its fingerprint")
        for path, fp in fingerprints(state).items():
            if fp != meta["leaves"][path]["fingerprint"]:
                raise CorruptCheckpoint(f"step {step}: leaf {path} does not match its fingerprint "
                                        "(bytes changed since it was saved)")
        return state, data

    def _check_fits(self, step: int, meta: dict, target) -> None:
        """Raise ModelMismatch naming the first leaf whose presence, shape or dtype differs."""
        saved = meta["leaves"]
        here = dict(sorted(zip(leaf_paths(target), jax.tree.leaves(target)),  # parameters first
                           key=lambda px: not px[0].startswith("params/")))
        problem = next((f"{p} is in this run but not in the checkpoint" for p in here if p not in saved), None)
        problem = problem or next((f"{p} is in the checkpoint but not in this run" for p in saved if p not in here), None)
        for p, x in here.items():
            if problem:
                break
            want = (list(x.shape), str(x.dtype))
            have = (saved[p].get("shape"), saved[p].get("dtype"))
            if tuple(have) != want:
                problem = f"{p} is {have[1]}{have[0]} in the checkpoint, {want[1]}{want[0]} here"
        if problem:
            raise ModelMismatch(f"checkpoint step {step} in {self.directory} does not fit this run: "
                                f"{problem}{self._config_diff(meta.get('config') or {})}")

    def _config_diff(self, saved: dict) -> str:
        diffs = [f"{sec}.{k}: {v!r} -> {self.run_config.get(sec, {}).get(k)!r}"
                 for sec in ("model", "optim") for k, v in (saved.get(sec) or {}).items()
                 if isinstance(self.run_config.get(sec), dict) and self.run_config[sec].get(k) != v]
        return f" (settings that differ: {', '.join(diffs[:6])})" if diffs else ""

    def _quarantine(self, step: int) -> str:
        src = epath.Path(self.directory) / str(step)
        dst = epath.Path(self.directory + ".corrupt") / f"{step}-{int(time.time())}"
        try:
            if jax.process_index() == 0:  # every process reached the same verdict; one moves it
                dst.parent.mkdir(parents=True, exist_ok=True)
                src.rename(dst)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"step {step} in {self.directory} is corrupt and could not be moved "
                                  f"aside ({_first_line(e)}); move or delete it, then resume") from e
        finally:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"deepflax-quarantine-{step}")
        self._mngr.reload()
        return os.fspath(dst)
