"""Model directories: one model's weights (one Orbax item per array), config and tokenizer.

Layout (what `convert` writes and training can start from):

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

from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.models import sharding
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import Params, init_params
from qstar_jax.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

MODEL_CONFIG_FILE = "model_config.json"


PARAMS_DIR = "params"


TOKENIZER_DIR = "tokenizer"


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
            checkpointer.save(paths.orbax_path(params_dir / item_name(path, layer)), {"value": array})
            checkpointer.wait_until_finished()
    save_model_files(directory, config, tokenizer)


def save_model_files(directory: str, config: ModelConfig, tokenizer: Tokenizer | None) -> None:
    """The config and tokenizer beside params or training checkpoints (tools read them);
    written by process 0 only. The config goes last: `is_model_dir` looks for it, so a
    directory cut short (on a bucket, written in place) is never taken for a model."""
    if not paths.is_writer():
        return
    if tokenizer is not None:
        tokenizer.save(str(paths.path(directory) / TOKENIZER_DIR))
    config.save(str(paths.path(directory) / MODEL_CONFIG_FILE))


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
                return checkpointer.restore(paths.orbax_path(params_dir / name), {"value": target})["value"]
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
