"""Training checkpoints, local or in a bucket: the one checkpoint module of a run.

A run's `WORKDIR/checkpoints/STEP/` holds the train state (params, optimizer state, step,
rng), the data position and the run's metadata (model and Quiet-STaR configs, the settings
that decide the result), plus a manifest of every file (manifest.py). `TrainCheckpoints`
writes them (asynchronously, keeping the newest and the best); `RunCheckpoints` adds the
run-level checks of a resume; `CheckpointReader` / `open_run` read a run without writing;
`load_for_inference` gives evaluation, generation and later runs a checkpoint's params from
a training run or a model directory (models/model_files.py). Restores land straight in the
target shardings, so the same files serve a laptop and a pod.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.models import sharding
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.model_files import is_model_dir, load_model, load_model_tokenizer, sharded_target
from qstar_jax.models.transformer import Params
from qstar_jax.training.manifest import verify_step, write_manifest
from qstar_jax.training.metrics import status
from qstar_jax.training.step import (
    TrainState,
)
from qstar_jax.training.storage import report_storage_failures_once, storage_failure

CHECKPOINTS_DIR = "checkpoints"
SELECTION_METRIC = "selection"  # the name a checkpoint's ranking value is stored under
CORRUPT_DIR = "corrupt_checkpoints"  # beside checkpoints/: steps that failed verification


# ---------------------------------------------------------------------- checkpoint manifests


# ---------------------------------------------------------------------- training checkpoints


class CheckpointWriteFailed(UserError):
    """A save that storage refused (full disk, quota, read-only); earlier steps are intact."""


def _selection_value(metrics: dict[str, float]) -> float:
    return metrics[SELECTION_METRIC]


class CheckpointReader:
    """Read-only access to a run's checkpoints: its steps, their selection metrics, a step's
    verification against its manifest, its run metadata and its params. The Orbax manager
    is opened read-only (no retention policy runs, nothing is created or deleted), so tools
    and later runs can read a run that another process may still be writing."""

    def __init__(self, directory: str, manager: ocp.CheckpointManager | None = None):
        self.directory = paths.absolute(directory)
        self.manager = manager or ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))

    def steps(self) -> list[int]:
        """Every finished step, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> paths.Path:
        return paths.path(self.directory) / str(step)

    def verify(self, step: int) -> str | None:
        """Why step `step` is corrupt (None: its files match its manifest)."""
        return verify_step(self.step_dir(step))

    def metrics(self) -> dict[int, float]:
        """The selection metric of every kept checkpoint that was saved with one."""
        values = {step: self.manager.metrics(step) for step in self.manager.all_steps()}
        return {step: float(m[SELECTION_METRIC]) for step, m in values.items() if m}

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, mesh: Mesh, param_dtype: str | None = None) -> tuple[Params, dict[str, Any]]:
        """(params, meta) of a step, sharded on `mesh`; the optimizer state is not read.

        For tools and for runs that start from another run (curriculum stages, the NTP
        teacher): shapes come from the checkpoint's metadata, shardings from `mesh`.
        """
        state_dir = paths.path(self.directory) / str(step) / "state"
        stored = ocp.StandardCheckpointer().metadata(paths.absolute(state_dir)).item_metadata["params"]
        target = {"params": sharded_target(stored, mesh, param_dtype)}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True),
            meta=ocp.args.JsonRestore(),
        ))
        return restored["state"]["params"], restored["meta"]

    def close(self) -> None:
        self.manager.close()


def open_run(path: str) -> CheckpointReader:
    """The checkpoints of the training run in `path` (its --workdir), read-only."""
    if not is_training_dir(path):
        raise UserError(f"{path} is not a training directory (no {CHECKPOINTS_DIR}/ in it)")
    return CheckpointReader(str(paths.path(path) / CHECKPOINTS_DIR))


class TrainCheckpoints(CheckpointReader):
    """Orbax `CheckpointManager` for training: state + data-iterator position + run metadata.

    Each step directory holds three items: `state` (params, optimizer state, step, rng;
    restored straight onto the target shardings), `data` (the next batch index) and `meta`
    (model and Quiet-STaR configs, checked before restoring so a workdir from another
    architecture fails with one clear line). Saves are asynchronous; Orbax writes to a
    temporary directory and renames it when complete, so a run killed mid-save leaves the
    previous checkpoint intact. Once a save is complete, process 0 adds MANIFEST_FILE to
    the step (`verify_step` checks it), so a corrupted or truncated step is found before it
    is restored rather than loaded silently.
    """

    def __init__(self, directory: str, keep: int, async_save: bool = True, best_mode: str | None = None):
        """Keeps the newest `keep` checkpoints; with `best_mode` ("min" or "max") also the one
        with the best metric passed to `save`, so a curriculum stage never loses its pick."""
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if best_mode is not None:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=_selection_value, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(  # best_fn: Orbax writes metrics only when it is set
            create=True, enable_async_checkpointing=async_save, best_mode=best_mode or "max",
            best_fn=None if best_mode is None else _selection_value,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        super().__init__(directory, ocp.CheckpointManager(paths.absolute(directory), options=options))
        self._unmanifested: list[int] = []  # saved steps whose manifest is not written yet
        report_storage_failures_once()

    def latest_verified_step(self) -> int | None:
        """The newest step whose files match its manifest."""
        self.wait()
        return next((s for s in sorted(self.manager.all_steps(), reverse=True) if self.verify(s) is None), None)

    def set_aside(self, step: int) -> str:
        """Moves a corrupt step out of Orbax's directory (never deleted: it may be inspected or
        repaired) so that a resumed run can save that step again; returns where it went."""
        target = paths.path(self.directory).parent / CORRUPT_DIR / str(step)
        if paths.is_writer():
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.parent / f"{step}.{len(list(target.parent.iterdir()))}"
            self.step_dir(step).rename(target)
        if jax.process_count() > 1:  # every process reloads the step list after the move
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return str(target)

    def _write_manifests(self) -> None:
        """Manifests of the saves that Orbax has finished (call after wait_until_finished)."""
        steps, self._unmanifested = self._unmanifested, []
        if paths.is_writer():
            kept = set(self.manager.all_steps())
            for step in steps:
                if step in kept:  # retention may already have removed it
                    write_manifest(self.step_dir(step))

    @contextlib.contextmanager
    def _storage_failures_named(self, step: int) -> Iterator[None]:
        """A save that storage refuses ends the run in one line naming the step, the cause
        and the newest step that is still intact (Orbax writes a step to a temporary
        directory and renames it when complete, so a failed save leaves earlier steps whole)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore wrap OS errors in many types
            if (failure := storage_failure(e)) is None:
                raise
            raise self._write_failed(step, failure) from None

    def _write_failed(self, step: int, why: str) -> CheckpointWriteFailed:
        intact = [s for s in self.manager.all_steps() if s < step]
        previous = f"step {max(intact)} is intact" if intact else "no earlier checkpoint exists"
        return CheckpointWriteFailed(f"cannot save checkpoint step {step} in {self.directory}: {why}; {previous}; "
                                     "fix the storage and rerun the same command to resume")

    def _check_room(self, step: int, state: dict[str, Any]) -> None:
        """Refuses a save that cannot fit on a local disk before Orbax writes a byte of it.

        A step takes about its arrays' bytes, and the old steps are removed only once the new
        one is complete. Checking first keeps the failure to one line: a disk that fills
        in the middle of an asynchronous save also ends in one line (`wait`), but Orbax's
        writer threads may print tracebacks before it. Buckets have no free space to read.
        """
        if paths.is_remote(self.directory):
            return
        needed_mib = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / 2**20  # global: every shard
        free_mib = shutil.disk_usage(self.directory).free / 2**20 if paths.is_writer() else 0.0
        if jax.process_count() > 1:  # one decision for every process: a save is a collective
            from jax.experimental import multihost_utils

            free_mib = float(multihost_utils.broadcast_one_to_all(np.float32(free_mib)))
        if free_mib < needed_mib:
            raise self._write_failed(step, f"no space left on device (it needs about {needed_mib:.1f} MiB, "
                                           f"{free_mib:.1f} MiB free)")

    def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any], meta: dict[str, Any],
             metric: float | None = None) -> None:
        self.wait()  # the previous save's manifest first (Orbax would wait for that save anyway)
        self._check_room(step, state)
        self._unmanifested.append(step)
        with self._storage_failures_named(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                metrics=None if metric is None else {SELECTION_METRIC: metric},
                force=True,
            )

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        with self._storage_failures_named(max(self._unmanifested, default=0)):
            self.manager.wait_until_finished()
            self._write_manifests()

    def close(self) -> None:
        self.wait()
        super().close()


# -------------------------------------------------------------------------------- inference


def is_training_dir(path: str) -> bool:
    return (paths.path(path) / CHECKPOINTS_DIR).is_dir()


def load_for_inference(path: str, step: int | None = None, mesh: Mesh | None = None,
                       param_dtype: str | None = None):
    """(model config, QuietStarConfig or None, params, tokenizer) from a run or a model directory.

    A training workdir (the `--workdir` of qstar_jax.train) gives its checkpoint at `step`
    (default: the newest) with thought parameters; a model directory (qstar_jax.convert)
    gives a plain LM. Params are restored into `mesh`'s shardings (default: FSDP over every
    device, so a model larger than one chip still loads for evaluation and generation).
    """
    mesh = mesh or sharding.make_mesh(1, -1, 1)
    if is_training_dir(path):
        ckpt = open_run(path)
        steps = ckpt.steps()
        if not steps:
            raise UserError(f"training directory {path} has no finished checkpoint yet")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UserError(f"training directory {path} has no checkpoint at step {step} "
                            f"(has {', '.join(map(str, sorted(steps)))})")
        if (problem := ckpt.verify(step)) is not None:
            raise UserError(f"checkpoint at step {step} in {path} is corrupt: {problem}")
        params, meta = ckpt.restore_params(step, mesh, param_dtype)
        ckpt.close()
        config = ModelConfig.from_dict(meta["model_config"])
        if param_dtype is not None:
            config = config.replace(param_dtype=param_dtype)
        qs = None if meta["quiet_star"] is None else QuietStarConfig(**meta["quiet_star"])
        return config, qs, params, load_model_tokenizer(path)
    if is_model_dir(path):
        if step is not None:
            raise UserError(f"{path} is a model directory; it has no training steps to choose from")
        config, params = load_model(path, mesh, param_dtype)
        return config, None, params, load_model_tokenizer(path)
    raise UserError(f"{path} is neither a training directory (with checkpoints/) nor a model directory")


def verified_start(ckpt: TrainCheckpoints) -> int | None:
    """The newest checkpoint step whose files match its manifest; each newer, corrupt one
    is moved aside (never deleted) with one line saying why. None: start from scratch."""
    step = ckpt.latest_step()
    while step is not None and (problem := ckpt.verify(step)) is not None:
        step = _set_aside(ckpt, step, f"is corrupt: {problem}")
    return step


def _set_aside(ckpt: TrainCheckpoints, step: int, why: str) -> int:
    """Moves a bad step aside; the step to resume from instead (refusing to start over)."""
    where = ckpt.set_aside(step)
    previous = verified_start(ckpt)
    if previous is None:
        raise UserError(f"checkpoint at step {step} {why}; moved to {where}, and no earlier checkpoint is left: "
                        "start again with a new --workdir")
    status(f"warning: checkpoint at step {step} {why}; moved to {where}, resuming from step {previous}")
    return previous


def restore_newest_readable(ckpt: RunCheckpoints, step: int, abstract_state, shardings, meta, train_documents: int,
                            allow_changes: bool) -> tuple[TrainState, int]:
    """Restores `step`, or the newest earlier step that reads, when Orbax cannot read it (a
    step without a manifest cannot be checked beforehand). Settings mismatches are not
    corruption: they stop the run."""
    while True:
        try:
            return ckpt.restore(step, abstract_state, shardings, meta, train_documents, allow_changes), step
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore raise many types for unreadable files
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            step = _set_aside(ckpt, step, f"is unreadable ({type(e).__name__}: {reason})")


class RunCheckpoints(TrainCheckpoints):
    """Training checkpoints that carry and check the run's model / method configs."""

    def _check_same_parameters(self, step: int, saved: dict[str, Any], meta: dict[str, Any]) -> None:
        """The architecture and the think gate decide the parameter tree: a resume that
        changes either is refused in one line (Orbax would fail to read every step)."""
        if saved["model_config"] != meta["model_config"]:
            differing = sorted(k for k in meta["model_config"]
                               if saved["model_config"].get(k) != meta["model_config"][k])
            raise UserError(f"checkpoint at step {step} in {self.directory} is for another model "
                            f"(differs in: {', '.join(differing)}); use a new --workdir")
        gate = lambda m: (m.get("quiet_star") or {}).get("think_gate", "")
        if gate(saved) != gate(meta):
            raise UserError(f"checkpoint at step {step} in {self.directory} was trained with think_gate "
                            f"{gate(saved)!r}, this run has {gate(meta)!r}: the gate changes the parameters; use a "
                            "new --workdir (init_from the run adds or drops the gate)")

    def save(self, step: int, state: TrainState, meta: dict[str, Any],  # type: ignore[override]
             metric: float | None = None, train_documents: int = 0) -> None:
        # The data position: rows are a pure function of (seed, step, row) over this many
        # training documents, so the next step is all a resume needs.
        super().save(step, state.to_dict(), {"next_step": step, "train_documents": train_documents}, meta, metric)

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState,  # type: ignore[override]
                meta: dict[str, Any], train_documents: int = 0, allow_changes: bool = False) -> TrainState:
        saved = self.restore_meta(step)
        self._check_same_parameters(step, saved, meta)
        changes = changed_settings(with_new_defaults(saved.get("settings", meta["settings"]), meta["settings"]),
                                   meta["settings"])
        if changes and not allow_changes:
            raise UserError(f"checkpoint at step {step} in {self.directory} was trained with other settings "
                            f"({'; '.join(changes)}); rerun with them, use a new --workdir, or pass "
                            "--config.allow_config_change=True")
        if changes:
            status(f"warning: resuming step {step} with changed settings: {'; '.join(changes)}")
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        state, data_state = super().restore(step, target.to_dict())
        if data_state["next_step"] != step:
            raise UserError(f"checkpoint at step {step} has inconsistent data state {data_state}")
        saved_documents = data_state.get("train_documents", train_documents)
        if saved_documents != train_documents:
            status(f"warning: the checkpoint was trained on {saved_documents} documents, the data now has "
                   f"{train_documents}: rows from step {step} on differ from an uninterrupted run")
        return TrainState.from_dict(state)


def with_new_defaults(saved_settings: dict[str, Any], current_settings: dict[str, Any]) -> dict[str, Any]:
    """Saved run settings with the quiet_star options added since they were saved (present in
    `current_settings`, absent from the checkpoint) at their defaults, which keep the old
    behaviour: an older checkpoint resumes unchanged."""
    saved_qs, current_qs = saved_settings.get("quiet_star"), current_settings.get("quiet_star")
    if not isinstance(saved_qs, dict) or not isinstance(current_qs, dict):
        return saved_settings
    defaults = {f.name: f.default for f in dataclasses.fields(QuietStarConfig)
                if f.name in current_qs and f.name not in saved_qs}
    return {**saved_settings, "quiet_star": {**defaults, **saved_qs}}


def changed_settings(saved: Any, current: Any, name: str = "") -> list[str]:
    """'key: saved -> current' for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for key in sorted(set(saved) | set(current))
                for change in changed_settings(saved.get(key), current.get(key), f"{name}.{key}" if name else key)]
    return [] if saved == current else [f"{name}: {saved!r} -> {current!r}"]
