"""Training checkpoints, local or in a bucket: how a run's steps are written and read.

A run's `WORKDIR/checkpoints/STEP/` holds the train state (params, optimizer state, step,
rng), the data position and the run's metadata (model and Quiet-STaR configs, the settings
that decide the result), plus a manifest of every file (manifest.py). `TrainCheckpoints`
writes them (asynchronously, keeping the newest and the best; resume.py's `RunCheckpoints`
adds the run-level checks of a resume); `CheckpointReader` / `open_run` read a run without
writing, passing over steps a run still training deletes under them;
`load_for_inference` gives evaluation, generation and later runs a checkpoint's params from
a training run or a model directory (models/model_files.py). Restores land straight in the
target shardings, so the same files serve a laptop and a pod.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
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
from qstar_jax.training.manifest import MANIFEST_FILE, record_committed_files, verify_step, write_manifest
from qstar_jax.training.storage import report_storage_failures_once, storage_failure, unraisable_reports_held

CHECKPOINTS_DIR = "checkpoints"
SELECTION_METRIC = "selection"  # the name a checkpoint's ranking value is stored under
CORRUPT_DIR = "corrupt_checkpoints"  # beside checkpoints/: steps that failed verification
ORBAX_TEMPORARY = ".orbax-checkpoint-tmp"  # STEP + this + a timestamp: a local step Orbax has not committed


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
        self.directory = paths.orbax_path(directory)  # a name Orbax cannot store is refused here
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

    # How long a step that stops reading is watched for its deletion to finish: Orbax
    # deletes a step's files first and its directory last.
    DELETION_WAITS_S = (0.05, 0.1, 0.2, 0.4, 0.8)

    LISTING_ATTEMPTS = 3

    @staticmethod
    def retry_listing(list_steps: Any, directory: str) -> Any:
        """`list_steps()` (opening a reader, reloading its steps), repeated when it fails with
        FileNotFoundError: Orbax reads the commit time of each step it lists, which fails for a
        step deleted in between (a run still training deletes old steps)."""
        for _ in range(CheckpointReader.LISTING_ATTEMPTS - 1):
            with contextlib.suppress(FileNotFoundError):
                return list_steps()
        try:
            return list_steps()
        except FileNotFoundError as e:
            raise UserError(f"cannot list the checkpoints in {directory}: steps keep disappearing ({e})") from None

    def current_steps(self) -> list[int]:
        """The finished steps as storage holds them now, oldest first (`steps` is the list
        as this reader last read it; a run still training saves steps and deletes old ones
        meanwhile)."""
        def reload() -> list[int]:
            self.manager.reload()
            return self.steps()

        return self.retry_listing(reload, self.directory)

    def is_deleted(self, step: int) -> bool:
        """Whether `step` is gone or going: out of the step list, or its directory or manifest
        removed (a step that verified once loses its manifest only to deletion). A step that
        stays whole for DELETION_WAITS_S is not being deleted."""
        for wait_s in (0.0, *self.DELETION_WAITS_S):
            time.sleep(wait_s)
            if step not in self.current_steps() or not (self.step_dir(step) / MANIFEST_FILE).exists():
                return True
        return False

    def _params_or_why_passed_over(self, step: int, mesh: Mesh, param_dtype: str | None):
        """(params, meta) of `step`, or why a reader passes it over: deleted (by the
        retention of a run still training, which deletes the manifest first), or without a
        manifest (saved by an older version): not verifiable. A step that stays and fails
        its manifest or does not read is damaged: one line."""
        if not (self.step_dir(step) / MANIFEST_FILE).exists():
            return ("was deleted while it was read" if step not in self.current_steps() else
                    f"has no {MANIFEST_FILE}, so it cannot be verified")
        params_and_meta, damage = None, ""
        with unraisable_reports_held() as unraisable_reports:
            try:
                if (problem := self.verify(step)) is None:
                    params_and_meta = self.restore_params(step, mesh, param_dtype)
                else:
                    damage = f"is corrupt: {problem}"
            except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore raise many types for files that go
                damage = f"is unreadable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"
        if params_and_meta is not None:
            sys.stderr.write("".join(unraisable_reports))
            return params_and_meta
        if self.is_deleted(step):
            return "was deleted while it was read"
        raise UserError(f"checkpoint at step {step} in {self.directory} {damage}")

    def read_params(self, step: int | None, mesh: Mesh, param_dtype: str | None = None
                    ) -> tuple[int, Params, dict[str, Any]]:
        """(step, params, meta) of `step` (None: the newest step that verifies), checked
        against its manifest, sharded on `mesh`. A run still training deletes old steps
        (retention) while readers list and read them: a newest step that goes, or has no
        manifest yet, is passed over for the next newest (the list reloaded each time), with
        a line on stderr; a requested step that goes, or no step left, is one line."""
        passed_over: list[str] = []
        steps = self.current_steps()
        if step is not None and step not in steps:
            raise UserError(f"{self.directory} has no checkpoint at step {step} "
                            f"(has {', '.join(map(str, steps)) or 'none'})")
        tried: set[int] = set()
        while True:
            candidates = [step] if step is not None else [s for s in steps if s not in tried]
            if not candidates:
                raise UserError(f"{self.directory} has no finished checkpoint yet" if not passed_over else
                                f"no checkpoint in {self.directory} can be read: {'; '.join(passed_over)}")
            chosen = max(candidates)
            result = self._params_or_why_passed_over(chosen, mesh, param_dtype)
            if not isinstance(result, str):
                if passed_over and paths.is_writer():
                    print(f"warning: {self.directory}: {'; '.join(passed_over)}; read step {chosen} instead",
                          file=sys.stderr, flush=True)
                return (chosen, *result)
            if step is not None:
                steps_now = ", ".join(map(str, self.current_steps())) or "none"
                raise UserError(f"checkpoint at step {step} in {self.directory} {result} (steps now: {steps_now})")
            passed_over.append(f"checkpoint step {chosen} {result}")
            tried.add(chosen)
            steps = self.current_steps()

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
    temporary directory and renames it when complete (on a bucket: writes in place, then a
    commit marker), so a run killed mid-save leaves the previous checkpoint intact. Once the
    step's files are complete and before Orbax commits them, process 0 adds MANIFEST_FILE
    (`verify_step` checks it): a committed step always has its manifest, and a corrupted or
    truncated one is found before it is restored rather than loaded silently.
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
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest_before_commit)
            if async_save else None,
            best_fn=None if best_mode is None else _selection_value,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        super().__init__(directory, ocp.CheckpointManager(paths.orbax_path(directory), options=options))
        self._unmanifested: int | None = None  # the step being saved, until its manifest is written
        self._in_flight: int | None = None  # the step being saved, until `wait` has seen it finish
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

    def _write_manifest_before_commit(self) -> None:
        """Orbax calls this from its save thread once the step's files are complete and before
        it commits them, so the manifest is in the step from the moment the step exists: no
        kill can leave a committed step without one."""
        if self._unmanifested is not None and paths.is_writer():
            root = paths.path(self.directory)
            temporary = [d for d in root.iterdir() if d.name.startswith(f"{self._unmanifested}{ORBAX_TEMPORARY}")]
            write_manifest(max(temporary, key=lambda d: d.name) if temporary else root / str(self._unmanifested))
        self._unmanifested = None

    def _write_manifest_after_commit(self, step: int | None) -> None:
        """Once Orbax has committed `step`: the files it rewrote at the commit added to the
        manifest, or a synchronous save's whole manifest (no callback runs before its commit)."""
        if step is None or not paths.is_writer() or step not in self.manager.all_steps():
            return
        if self._unmanifested is not None:
            write_manifest(self.step_dir(step))
        record_committed_files(self.step_dir(step))

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
        self._unmanifested = self._in_flight = step
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
        with self._storage_failures_named(self._in_flight or 0):
            self.manager.wait_until_finished()
            self._write_manifest_after_commit(self._in_flight)
        self._unmanifested = self._in_flight = None

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
        ckpt = CheckpointReader.retry_listing(lambda: open_run(path), path)
        try:
            step, params, meta = ckpt.read_params(step, mesh, param_dtype)
        finally:
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
