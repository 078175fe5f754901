"""Model directories and training checkpoints, local or in a bucket, restored into shardings.

Layout of a model directory (what `convert` writes and training can start from):

    DIR/model_config.json        ModelConfig (architecture + dtypes)
    DIR/params/NAME/             one Orbax checkpoint per array: a parameter, or one layer of
                                 a scanned layer stack (embed_tokens.embedding,
                                 layers.3.q_proj.kernel), so a writer holds one layer's
                                 tensor at a time and converting a 7B model does not need
                                 the model in host memory
    DIR/tokenizer/               optional: tokenizer files (see tokenizer.py)

Orbax handles local paths and bucket paths (gs://...) alike and restores straight onto a
sharding when the abstract target carries one, so the same files serve a laptop and a pod.
"""

from __future__ import annotations

import contextlib
import json
import logging as pylogging
import shutil
import warnings
import zlib
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qstar_jax import paths, sharding
from qstar_jax.config import ModelConfig, QuietStarConfig
from qstar_jax.errors import UserError
from qstar_jax.model import Params, init_params
from qstar_jax.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
SELECTION_METRIC = "selection"  # the name a checkpoint's ranking value is stored under
MANIFEST_FILE = "manifest.json"  # in a step directory: every other file's size and checksum
CORRUPT_DIR = "corrupt_checkpoints"  # beside checkpoints/: steps that failed verification


def sharded_target(abstract_params: Any, mesh: Mesh, param_dtype: str | None = None) -> Any:
    """ShapeDtypeStructs carrying the mesh's shardings: what a restore fills, shard by shard.

    With `param_dtype`, floating leaves are restored in that dtype (a bfloat16 checkpoint
    becomes float32 master weights); Orbax casts while reading, per shard.
    """
    shardings = sharding.param_shardings(abstract_params, mesh)

    def target(leaf, leaf_sharding):
        dtype = leaf.dtype
        if param_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.dtype(param_dtype)
        return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf_sharding)

    return jax.tree.map(target, abstract_params, shardings)


LAYER_STACK = "layers"  # params under this key carry the scanned layer axis first


def item_name(path: tuple[str, ...], layer: int | None) -> str:
    """The directory of one stored array: `embed_tokens.embedding`, `layers.3.q_proj.kernel`."""
    return ".".join(path if layer is None else (path[0], str(layer), *path[1:]))


def param_items(params: Params) -> Iterator[tuple[tuple[str, ...], int | None, jax.Array]]:
    """A params tree as stored items: layer stacks split into one array per layer."""
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = tuple(k.key for k in key_path)
        for layer in range(leaf.shape[0]) if path[0] == LAYER_STACK else [None]:
            yield path, layer, leaf if layer is None else leaf[layer]


def save_model(directory: str, config: ModelConfig, params: Params | Iterable[tuple[tuple[str, ...], int | None, Any]],
               tokenizer: Tokenizer | None = None) -> None:
    """Writes a model directory (params, model_config.json, tokenizer/) locally or to a bucket.

    `params` is a params tree, or (path, layer, array) items as `hf.hf_model_items` streams
    them: each item is written and let go before the next is taken, so converting a model
    holds one layer's tensor, not the model. Every process calls this (an Orbax save is
    collective); process 0 writes the small files.
    """
    params_dir = paths.path(directory) / PARAMS_DIR
    if params_dir.exists():
        raise UserError(f"{directory} already holds a model; choose an empty output directory")
    items = param_items(params) if isinstance(params, dict) else params
    with ocp.StandardCheckpointer() as checkpointer:
        for path, layer, array in items:
            checkpointer.save(paths.absolute(params_dir / item_name(path, layer)), {"value": array})
            checkpointer.wait_until_finished()
    save_model_files(directory, config, tokenizer)


def save_model_files(directory: str, config: ModelConfig, tokenizer: Tokenizer | None) -> None:
    """The config and tokenizer beside params or training checkpoints (tools read them);
    written by process 0 only."""
    if not paths.is_writer():
        return
    config.save(str(paths.path(directory) / MODEL_CONFIG_FILE))
    if tokenizer is not None:
        tokenizer.save(str(paths.path(directory) / TOKENIZER_DIR))


def is_model_dir(directory: str) -> bool:
    return (paths.path(directory) / MODEL_CONFIG_FILE).is_file() and (paths.path(directory) / PARAMS_DIR).is_dir()


def load_model_config(directory: str) -> ModelConfig:
    if not is_model_dir(directory):
        raise UserError(f"{directory} is not a qstar_jax model directory (needs {MODEL_CONFIG_FILE} and {PARAMS_DIR}/)")
    return ModelConfig.load(str(paths.path(directory) / MODEL_CONFIG_FILE))


def load_model(directory: str, mesh: Mesh | None = None, param_dtype: str | None = None) -> tuple[ModelConfig, Params]:
    """Restores (config, params) straight into `mesh`'s shardings (default: the host CPU).

    Each device reads only its shard; nothing depends on the devices that saved the files.
    A layer stack is restored layer by layer and stacked on the devices, which briefly hold
    its shard twice. `param_dtype` (e.g. float32 master weights) overrides the stored dtype.
    """
    config = load_model_config(directory)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    target = sharded_target(abstract, mesh or sharding.host_mesh(), param_dtype)
    params_dir = paths.path(directory) / PARAMS_DIR
    saved = {child.name for child in params_dir.iterdir()}
    with ocp.StandardCheckpointer() as checkpointer:

        def restore(name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
            if name not in saved:
                raise UserError(f"params in {directory} do not match its model config: no parameter {name}")
            try:
                return checkpointer.restore(paths.absolute(params_dir / name), {"value": target})["value"]
            except ValueError as e:  # orbax reports shape mismatches as ValueError
                raise UserError(f"params in {directory} do not match its model config: {name}: "
                                f"{str(e).splitlines()[0]}") from e

        def restore_param(key_path, target: jax.ShapeDtypeStruct) -> jax.Array:
            path = tuple(k.key for k in key_path)
            if path[0] != LAYER_STACK:
                return restore(item_name(path, None), target)
            spec = target.sharding.spec
            layer_target = jax.ShapeDtypeStruct(target.shape[1:], target.dtype, sharding=NamedSharding(
                target.sharding.mesh, P(*tuple(spec)[1:])))
            layers = [restore(item_name(path, i), layer_target) for i in range(target.shape[0])]
            return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=target.sharding)(*layers)

        params = jax.tree_util.tree_map_with_path(restore_param, target)
    return config, params


def load_model_tokenizer(directory: str) -> Tokenizer:
    tokenizer_dir = str(paths.path(directory) / TOKENIZER_DIR)
    if not has_tokenizer(tokenizer_dir):
        raise UserError(f"model directory {directory} has no tokenizer/")
    return load_tokenizer(tokenizer_dir)


# ---------------------------------------------------------------------- checkpoint manifests


def file_checksum(p: paths.Path) -> str:
    """A checksum tagged with its algorithm. A bucket object's is the CRC32C the store
    computed at upload (read from its metadata: verifying a 7B checkpoint must not mean
    downloading it); a local file's is the CRC-32 of its bytes."""
    if paths.is_remote(p):
        import gcsfs  # the backend epath uses for gs:// paths

        info = gcsfs.GCSFileSystem().info(str(p))
        if info.get("crc32c"):
            return f"crc32c:{info['crc32c']}"
        return f"md5:{info['md5Hash']}"
    crc = 0
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def step_files(step_dir: paths.Path) -> dict[str, dict[str, Any]]:
    """{path relative to the step directory: {"bytes", "checksum"}} for every file but the manifest."""
    prefix = len(str(step_dir).rstrip("/")) + 1
    return {
        str(f)[prefix:]: {"bytes": f.stat().length, "checksum": file_checksum(f)}
        for f in paths.files_under(step_dir) if f.name != MANIFEST_FILE
    }


def write_manifest(step_dir: paths.Path) -> None:
    """Records the finished step's files, atomically (after Orbax has finalised the step)."""
    paths.write_text(step_dir / MANIFEST_FILE, json.dumps({"files": step_files(step_dir)}, indent=1))


def verify_step(step_dir: paths.Path) -> str | None:
    """Why the step's files differ from its manifest (None: they match). A step without
    a manifest (saved before manifests existed, or killed between Orbax's commit and the
    manifest) cannot be checked and passes; reading it is then the only test."""
    manifest_file = step_dir / MANIFEST_FILE
    if not manifest_file.exists():
        return None
    try:
        recorded = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError):
        return f"its {MANIFEST_FILE} is unreadable"
    found = step_files(step_dir)
    for name, entry in sorted(recorded.items()):
        if name not in found:
            return f"{name} is missing"
        if found[name]["bytes"] != entry["bytes"]:
            return f"{name} has {found[name]['bytes']} bytes, {entry['bytes']} when saved"
        if found[name]["checksum"] != entry["checksum"]:
            return f"{name} does not match its checksum ({found[name]['checksum']}, {entry['checksum']} when saved)"
    return None


# ---------------------------------------------------------------------- training checkpoints

# Storage failures a user fixes outside the program (free space, a writable mount), as
# Orbax and tensorstore word them: their errors are ValueErrors or RuntimeErrors that
# carry the OS error's text, raised from the background thread that did the write.
STORAGE_FAILURES = {
    "No space left on device": "no space left on device",
    "os_error_code='28'": "no space left on device",
    "Disk quota exceeded": "disk quota exceeded",
    "Read-only file system": "read-only file system",
    "Permission denied": "permission denied",
}


def storage_failure(error: BaseException) -> str | None:
    """What storage failure (ENOSPC, EDQUOT, EROFS, EACCES) `error` or its causes report, if any."""
    while error is not None:
        text = str(error)
        for signature, name in STORAGE_FAILURES.items():
            if signature in text:
                return name
        error = error.__cause__ or error.__context__
    return None


class _StorageFailureLogs(pylogging.Filter):
    """Drops the logs of a storage failure: each of Orbax's writer threads logs the same
    ENOSPC with a traceback (through absl), and at exit asyncio logs every write it had
    not finished; `TrainCheckpoints` reports the failure in one line instead."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        exception = record.exc_info[1] if record.exc_info else None
        return not (any(signature in record.getMessage() for signature in STORAGE_FAILURES)
                    or (exception is not None and storage_failure(exception) is not None))


def _report_storage_failures_once() -> None:
    """Installs the filter above (once per process) and silences the warning Python prints
    at exit for the writes of the failed save it never ran."""
    for name in ("absl", "asyncio"):
        logger = pylogging.getLogger(name)
        if not any(isinstance(f, _StorageFailureLogs) for f in logger.filters):
            logger.addFilter(_StorageFailureLogs())
    warnings.filterwarnings("ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning)


class CheckpointWriteFailed(UserError):
    """A save that storage refused (full disk, quota, read-only); earlier steps are intact."""


def _selection_value(metrics: dict[str, float]) -> float:
    return metrics[SELECTION_METRIC]


class TrainCheckpoints:
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
        self.directory = paths.absolute(directory)
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
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._unmanifested: list[int] = []  # saved steps whose manifest is not written yet
        _report_storage_failures_once()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> paths.Path:
        return paths.path(self.directory) / str(step)

    def verify(self, step: int) -> str | None:
        """Why step `step` is corrupt (None: its files match its manifest)."""
        return verify_step(self.step_dir(step))

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

    def metrics(self) -> dict[int, float]:
        """The selection metric of every kept checkpoint that was saved with one."""
        values = {step: self.manager.metrics(step) for step in self.manager.all_steps()}
        return {step: float(m[SELECTION_METRIC]) for step, m in values.items() if m}

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

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

    def wait(self) -> None:
        with self._storage_failures_named(max(self._unmanifested, default=0)):
            self.manager.wait_until_finished()
            self._write_manifests()

    def close(self) -> None:
        self.wait()
        self.manager.close()


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
        ckpt = TrainCheckpoints(str(paths.path(path) / CHECKPOINTS_DIR), keep=1_000_000)
        steps = ckpt.manager.all_steps()
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
