"""Model directories on disk: an Orbax checkpoint of the params plus the model config.

Layout of a model directory (what `convert` writes and training can start from):

    DIR/model_config.json   ModelConfig (architecture + dtypes)
    DIR/params/             Orbax StandardCheckpointer tree of the LM params
    DIR/tokenizer/          optional: tokenizer files (see tokenizer.py)

Orbax handles local paths and bucket paths (gs://...) alike and restores straight onto a
sharding when the abstract target carries one, so the same files serve a laptop and a pod.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from qstar_jax.config import ModelConfig, QuietStarConfig
from qstar_jax.errors import UserError
from qstar_jax.model import Params, init_params
from qstar_jax.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
SELECTION_METRIC = "selection"  # the name a checkpoint's ranking value is stored under


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def save_model(directory: str, config: ModelConfig, params: Params, tokenizer: Tokenizer | None = None) -> None:
    directory = _absolute(directory)
    os.makedirs(directory, exist_ok=True)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        raise UserError(f"{directory} already holds a model; choose an empty output directory")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
    config.save(os.path.join(directory, MODEL_CONFIG_FILE))
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, TOKENIZER_DIR))


def save_model_files(directory: str, config: ModelConfig, tokenizer: Tokenizer) -> None:
    """The config and tokenizer a training workdir needs beside its checkpoints (tools read them)."""
    os.makedirs(directory, exist_ok=True)
    config.save(os.path.join(directory, MODEL_CONFIG_FILE))
    tokenizer.save(os.path.join(directory, TOKENIZER_DIR))


def is_model_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MODEL_CONFIG_FILE)) and os.path.isdir(
        os.path.join(directory, PARAMS_DIR)
    )


def load_model_config(directory: str) -> ModelConfig:
    if not is_model_dir(directory):
        raise UserError(f"{directory} is not a qstar_jax model directory (needs {MODEL_CONFIG_FILE} and {PARAMS_DIR}/)")
    return ModelConfig.load(os.path.join(directory, MODEL_CONFIG_FILE))


def load_model(directory: str, abstract_params: Any = None) -> tuple[ModelConfig, Params]:
    """Restores (config, params); `abstract_params` (ShapeDtypeStructs, maybe sharded) sets layout."""
    config = load_model_config(directory)
    if abstract_params is None:
        abstract_params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    try:
        params = ocp.StandardCheckpointer().restore(
            os.path.join(_absolute(directory), PARAMS_DIR), abstract_params
        )
    except ValueError as e:  # orbax reports tree/shape mismatches as ValueError
        raise UserError(f"params in {directory} do not match its model config: {str(e).splitlines()[0]}") from e
    return config, params


def load_model_tokenizer(directory: str) -> Tokenizer:
    tokenizer_dir = os.path.join(directory, TOKENIZER_DIR)
    if not has_tokenizer(tokenizer_dir):
        raise UserError(f"model directory {directory} has no tokenizer/")
    return load_tokenizer(tokenizer_dir)


# ---------------------------------------------------------------------- training checkpoints


def _selection_value(metrics: dict[str, float]) -> float:
    return metrics[SELECTION_METRIC]


class TrainCheckpoints:
    """Orbax `CheckpointManager` for training: state + data-iterator position + run metadata.

    Each step directory holds three items: `state` (params, optimizer state, step, rng;
    restored straight onto the target shardings), `data` (the next batch index) and `meta`
    (model and Quiet-STaR configs, checked before restoring so a workdir from another
    architecture fails with one clear line). Saves are asynchronous; Orbax writes to a
    temporary directory and renames it when complete, so a run killed mid-save leaves the
    previous checkpoint intact.
    """

    def __init__(self, directory: str, keep: int, async_save: bool = True, best_mode: str | None = None):
        """Keeps the newest `keep` checkpoints; with `best_mode` ("min" or "max") also the one
        with the best metric passed to `save`, so a curriculum stage never loses its pick."""
        self.directory = _absolute(directory)
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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any], meta: dict[str, Any],
             metric: float | None = None) -> None:
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

    def restore_on_one_device(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of a step onto the first local device, whatever mesh saved it.

        For tools (evaluation, generation, tests) that read a training run's result.
        """
        state_dir = os.path.join(self.directory, str(step), "state")
        tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# -------------------------------------------------------------------------------- inference


def is_training_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))


def load_for_inference(path: str, step: int | None = None):
    """(model config, QuietStarConfig or None, params, tokenizer) from a run or a model directory.

    A training workdir (the `--workdir` of qstar_jax.train) gives its checkpoint at `step`
    (default: the newest) with thought parameters; a model directory (qstar_jax.convert)
    gives a plain LM.
    """
    if is_training_dir(path):
        ckpt = TrainCheckpoints(os.path.join(path, CHECKPOINTS_DIR), keep=1_000_000)
        steps = ckpt.manager.all_steps()
        if not steps:
            raise UserError(f"training directory {path} has no finished checkpoint yet")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UserError(f"training directory {path} has no checkpoint at step {step} "
                            f"(has {', '.join(map(str, sorted(steps)))})")
        state, meta = ckpt.restore_on_one_device(step)
        ckpt.close()
        config = ModelConfig.from_dict(meta["model_config"])
        qs = None if meta["quiet_star"] is None else QuietStarConfig(**meta["quiet_star"])
        return config, qs, state["params"], load_model_tokenizer(path)
    if is_model_dir(path):
        if step is not None:
            raise UserError(f"{path} is a model directory; it has no training steps to choose from")
        config, params = load_model(path)
        return config, None, params, load_model_tokenizer(path)
    raise UserError(f"{path} is neither a training directory (with checkpoints/) nor a model directory")
