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

from qstar_jax.config import ModelConfig
from qstar_jax.errors import UserError
from qstar_jax.model import Params, init_params
from qstar_jax.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


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
