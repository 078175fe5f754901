"""Hugging Face checkpoints in and out (llama, mistral, qwen2), without importing torch.

One flat table maps each HF tensor name to a Flax parameter path and a transform; layer
tensors (`{i}` in the name) are stacked along the leading axis of the scanned layer
parameters. Everything else here is bookkeeping: which entries apply to a config
(biases, untied LM head), and clear errors for missing, unexpected or mis-shaped tensors.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qstar_jax.config import SUPPORTED_MODEL_TYPES, ModelConfig
from qstar_jax.errors import UserError
from qstar_jax.model import Params, init_params

# (HF tensor name, Flax path, transform). "linear": HF stores (out, in), Flax (in, out).
PARAM_TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("model.embed_tokens.weight", ("embed_tokens", "embedding"), "identity"),
    ("model.norm.weight", ("final_norm", "scale"), "identity"),
    ("lm_head.weight", ("lm_head", "kernel"), "linear"),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "scale"), "identity"),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), "identity"),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "q_proj", "kernel"), "linear"),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "k_proj", "kernel"), "linear"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "v_proj", "kernel"), "linear"),
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "q_proj", "bias"), "identity"),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "k_proj", "bias"), "identity"),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "v_proj", "bias"), "identity"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "o_proj", "kernel"), "linear"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "gate_proj", "kernel"), "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "up_proj", "kernel"), "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "down_proj", "kernel"), "linear"),
)
# Tensors some checkpoints carry that hold nothing we need (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


# ---------------------------------------------------------------------------- config.json


def _rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"unsupported RoPE type {rope_type!r}; only default RoPE is implemented")
    return float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], param_dtype: str = "float32") -> ModelConfig:
    """Translates a HF `config.json` dict into a `ModelConfig`, refusing what we don't compute."""
    try:
        return _config_from_hf(hf, param_dtype)
    except KeyError as e:
        raise UserError(f"config.json lacks required key {e.args[0]!r}") from None


def _config_from_hf(hf: dict[str, Any], param_dtype: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf.get("mlp_bias"):
        raise UserError("mlp_bias=True is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise UserError("llama attention_bias=True (bias on q/k/v/o) is not supported")
    sliding_window = None
    if model_type == "mistral":
        sliding_window = hf.get("sliding_window")
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise UserError("qwen2 use_sliding_window=True (per-layer windows) is not supported")
    num_heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=_rope_theta(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        sliding_window=sliding_window,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        param_dtype=param_dtype,
    )


def config_to_hf(config: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    hf = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if config.model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    if config.model_type == "qwen2":
        hf["use_sliding_window"] = False
    return hf


# ------------------------------------------------------------------------- name mapping


def _get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _entries(config: ModelConfig, param_shapes: Params) -> Iterable[tuple[str, tuple[str, ...], str, bool]]:
    """Table rows that apply to this config: (HF name, Flax path, transform, per-layer)."""
    for hf_name, path, transform in PARAM_TABLE:
        if _get_path(param_shapes, path) is not None:
            yield hf_name, path, transform, "{i}" in hf_name


def _to_flax(array: np.ndarray, transform: str) -> np.ndarray:
    return array.T if transform == "linear" else array


def _abstract_params(config: ModelConfig) -> Params:
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


# ---------------------------------------------------------------------------- load / save


def _tensor_files(path: str) -> dict[str, str]:
    """Maps every tensor name to the safetensors file that holds it."""
    if not os.path.isdir(path):
        raise UserError(f"not a directory: {path}")
    index_path = os.path.join(path, "model.safetensors.index.json")
    single_path = os.path.join(path, "model.safetensors")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    if os.path.isfile(single_path):
        with safe_open(single_path, framework="np") as f:
            return {name: single_path for name in f.keys()}
    raise UserError(f"{path} is not a Hugging Face checkpoint: no model.safetensors or model.safetensors.index.json")


def read_hf_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{path} is not a Hugging Face checkpoint: config.json is missing")
    with open(config_path) as f:
        return json.load(f)


def params_from_hf_tensors(
    config: ModelConfig, names: Iterable[str], read: Callable[[str], np.ndarray], source: str
) -> Params:
    """Builds params from tensors under HF names (`read(name)` -> array), checking them all.

    Shared by the safetensors and GGUF readers: every source is first put in HF naming.
    """
    names = set(names)
    shapes = _abstract_params(config)
    entries = list(_entries(config, shapes))
    expected = {
        hf_name.format(i=i)
        for hf_name, _, _, per_layer in entries
        for i in (range(config.num_layers) if per_layer else [None])
    }
    missing = sorted(expected - names)
    if missing:
        raise UserError(f"checkpoint {source} lacks tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(
        name
        for name in names - expected
        if not name.endswith(IGNORED_SUFFIXES) and not (config.tie_word_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        raise UserError(
            f"checkpoint {source} has tensors this {config.model_type} config does not use: {', '.join(unexpected[:8])}"
        )
    params: Params = {}
    dtype = jnp.dtype(config.param_dtype)
    for hf_name, path_, transform, per_layer in entries:
        layer_names = [hf_name.format(i=i) for i in range(config.num_layers)] if per_layer else [hf_name]
        arrays = [_to_flax(read(name), transform) for name in layer_names]
        array = np.stack(arrays) if per_layer else arrays[0]
        want = _get_path(shapes, path_).shape
        if array.shape != want:
            raise UserError(f"tensor {hf_name} has shape {array.shape} after mapping, expected {want}")
        _set_path(params, path_, jnp.asarray(array, dtype=dtype))
    return params


def load_hf_model(path: str, param_dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Reads a HF model directory into (ModelConfig, params) with params in `param_dtype`."""
    config = config_from_hf(read_hf_config(path), param_dtype=param_dtype)
    files = _tensor_files(path)
    handles: dict[str, Any] = {}

    def read(name: str) -> np.ndarray:
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="np")
        return handles[file].get_tensor(name)

    return config, params_from_hf_tensors(config, files, read, path)


def save_hf_model(config: ModelConfig, params: Params, path: str, dtype: str | None = None) -> None:
    """Writes `config.json` + `model.safetensors` that transformers' `from_pretrained` loads."""
    dtype = dtype or config.param_dtype
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for hf_name, path_, transform, per_layer in _entries(config, params):
        array = np.asarray(jax.device_get(_get_path(params, path_))).astype(jnp.dtype(dtype))
        if per_layer:
            for i in range(config.num_layers):
                tensors[hf_name.format(i=i)] = np.ascontiguousarray(_to_flax(array[i], transform))
        else:
            tensors[hf_name] = np.ascontiguousarray(_to_flax(array, transform))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config, dtype), f, indent=2)
