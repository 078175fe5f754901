"""Hugging Face checkpoints in and out (llama, mistral, qwen2), without importing torch.

One flat table maps each HF tensor name to a Flax parameter path and a transform; layer
tensors (`{i}` in the name) are stacked along the leading axis of the scanned layer
parameters. Everything else here is bookkeeping: which entries apply to a config
(biases, untied LM head), and clear errors for missing, unexpected or mis-shaped tensors.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from safetensors.numpy import save as save_safetensors

from qstar_jax import paths
from qstar_jax.models import sharding
from qstar_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from qstar_jax.errors import UserError
from qstar_jax.models.transformer import Params, init_params

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

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on the JSON header
# Floating weights only: an integer tensor (a quantised or damaged checkpoint) would be cast
# to float without a word and give a model of nonsense.
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


class SafetensorsFile:
    """Lazy tensors of one `.safetensors` file: shapes from its header, data read on slicing.

    The format is an 8-byte header length, a JSON header (dtype, shape, byte range per
    tensor) and the raw bytes. A local file is memory-mapped, so a slice reads only the pages
    it covers; a bucket file is read one tensor at a time through the path layer. Reading it
    ourselves also gives bfloat16 (ml_dtypes), which safetensors' numpy reader refuses.
    """

    def __init__(self, file: str):
        self.file = file
        with paths.path(file).open("rb") as f:
            length = f.read(8)
            size = int(np.frombuffer(length, np.uint64)[0]) if len(length) == 8 else -1
            raw = f.read(size) if 0 < size <= MAX_HEADER_BYTES else b""
        try:
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{file} is not a readable safetensors file (its header is truncated or corrupt)") from None
        self.data_start = 8 + size
        header.pop("__metadata__", None)
        self.header = header
        self._check_dtypes()
        self._check_size(paths.path(file).stat().length - self.data_start)

    def _check_dtypes(self) -> None:
        """Every tensor's dtype is checked when the file is opened, before anything is converted."""
        for name, info in self.header.items():
            if info.get("dtype") not in SAFETENSORS_DTYPES:
                raise UserError(f"{self.file}: tensor {name} has dtype {info.get('dtype')}; only floating-point "
                                f"weights ({', '.join(SAFETENSORS_DTYPES)}) are read, not cast from another dtype")

    def _check_size(self, data_bytes: int) -> None:
        """A file cut short (an interrupted download) would fail at the first tensor past the
        cut, deep in a conversion: compare the header's byte ranges with the file once."""
        end = max((info["data_offsets"][1] for info in self.header.values()), default=0)
        if data_bytes < end:
            raise UserError(f"{self.file} is truncated: its header describes {end} bytes of tensors, "
                            f"the file holds {data_bytes}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        info = self.header[name]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if paths.is_remote(self.file):
            with paths.path(self.file).open("rb") as f:
                f.seek(self.data_start + begin)
                array = np.frombuffer(f.read(end - begin), dtype).reshape(shape)
        else:
            array = np.memmap(self.file, dtype, "r", offset=self.data_start + begin, shape=shape)
        return np.array(array[index])


def _tensor_files(path: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor name to the safetensors file that holds it."""
    directory = paths.path(path)
    if not directory.is_dir():
        raise UserError(f"not a directory: {path}")
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            raise UserError(f"{index_path} is not a safetensors index (JSON with a weight_map)") from None
        files = {file: SafetensorsFile(str(directory / file)) for file in sorted(set(weight_map.values()))}
        return {name: files[file] for name, file in weight_map.items()}
    if (directory / "model.safetensors").is_file():
        single = SafetensorsFile(str(directory / "model.safetensors"))
        return {name: single for name in single.header}
    raise UserError(f"{path} is not a Hugging Face checkpoint: no model.safetensors or model.safetensors.index.json")


def read_hf_config(path: str) -> dict[str, Any]:
    config_path = paths.path(path) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} is not a Hugging Face checkpoint: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object")
    return config


# read(hf_name, index in HF layout) -> that slice of the tensor, as numpy
SliceReader = Callable[[str, tuple[slice, ...]], np.ndarray]


def _check_names(config: ModelConfig, entries: list, names: set[str], source: str) -> None:
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


def _check_shapes(config: ModelConfig, entries: list, shapes: dict[str, tuple[int, ...]], abstract: Params) -> None:
    for hf_name, path_, transform, per_layer in entries:
        layer_names = [hf_name.format(i=i) for i in range(config.num_layers)] if per_layer else [hf_name]
        want = _get_path(abstract, path_).shape[1 if per_layer else 0:]  # one layer's
        want_hf = tuple(reversed(want)) if transform == "linear" else want
        for name in layer_names:
            if tuple(shapes[name]) != want_hf:
                raise UserError(f"tensor {name} has shape {tuple(shapes[name])}, expected {want_hf} for this config")


def params_from_hf_tensors(config: ModelConfig, shapes: dict[str, tuple[int, ...]], read: SliceReader,
                           source: str, mesh: Mesh | None = None) -> Params:
    """Params from tensors under HF names, every name and shape checked first, built straight
    into their shardings on `mesh` (default: one host CPU device).

    `shapes` maps every HF name in the checkpoint to its shape; `read(name, index)` reads one
    slice of one tensor. Each parameter is assembled with `jax.make_array_from_callback`, so
    every device reads and receives only its own shard. Shared by the safetensors and GGUF
    readers: every source is first put in HF naming.
    """
    mesh = mesh or sharding.host_mesh()
    abstract = _abstract_params(config)
    entries = list(_entries(config, abstract))
    _check_names(config, entries, set(shapes), source)
    _check_shapes(config, entries, shapes, abstract)
    shardings = sharding.param_shardings(abstract, mesh)
    dtype = jnp.dtype(config.param_dtype)
    params: Params = {}
    for hf_name, path_, transform, per_layer in entries:
        layer_names = [hf_name.format(i=i) for i in range(config.num_layers)] if per_layer else [hf_name]

        def fetch(index: tuple[slice, ...], layer_names=layer_names, transform=transform, per_layer=per_layer):
            inner = index[1:] if per_layer else index
            hf_index = tuple(reversed(inner)) if transform == "linear" else tuple(inner)
            if not per_layer:
                return _to_flax(read(layer_names[0], hf_index), transform).astype(dtype)
            layers = layer_names[index[0]]
            first = _to_flax(read(layers[0], hf_index), transform)
            out = np.empty((len(layers), *first.shape), dtype)  # filled in place: one shard's worth
            out[0] = first
            for i, name in enumerate(layers[1:], 1):
                out[i] = _to_flax(read(name, hf_index), transform)
            return out

        want = _get_path(abstract, path_).shape
        _set_path(params, path_, jax.make_array_from_callback(want, _get_path(shardings, path_), fetch))
    return params


def _open_hf(path: str, param_dtype: str) -> tuple[ModelConfig, dict[str, tuple[int, ...]], SliceReader]:
    config = config_from_hf(read_hf_config(path), param_dtype=param_dtype)
    files = _tensor_files(path)
    shapes = {name: file.shape(name) for name, file in files.items()}
    return config, shapes, lambda name, index: files[name].read(name, index)


def load_hf_model(path: str, param_dtype: str = "float32", mesh: Mesh | None = None) -> tuple[ModelConfig, Params]:
    """Reads a HF model directory into (ModelConfig, params in `param_dtype`), sharded on `mesh`."""
    config, shapes, read = _open_hf(path, param_dtype)
    return config, params_from_hf_tensors(config, shapes, read, path, mesh)


ParamItems = Iterator[tuple[tuple[str, ...], int | None, np.ndarray]]  # (Flax path, layer or None, array)


def hf_model_items(path: str, param_dtype: str = "float32") -> tuple[ModelConfig, ParamItems]:
    """(ModelConfig, the parameters as host numpy arrays one layer at a time): what `convert`
    streams into a model directory, holding one layer's tensor and never touching a device.
    Every name and shape is checked before this returns."""
    config, shapes, read = _open_hf(path, param_dtype)
    abstract = _abstract_params(config)
    entries = list(_entries(config, abstract))
    _check_names(config, entries, set(shapes), path)
    _check_shapes(config, entries, shapes, abstract)
    dtype = jnp.dtype(param_dtype)

    def items() -> ParamItems:
        for hf_name, path_, transform, per_layer in entries:
            for layer in range(config.num_layers) if per_layer else [None]:
                name = hf_name.format(i=layer)
                yield path_, layer, _to_flax(read(name, ()), transform).astype(dtype)

    return config, items()


def save_hf_model(config: ModelConfig, params: Params, path: str, dtype: str | None = None) -> None:
    """Writes `config.json` + `model.safetensors` that transformers' `from_pretrained` loads;
    the config last, so a directory cut short on a bucket is no checkpoint to any reader."""
    dtype = dtype or config.param_dtype
    tensors: dict[str, np.ndarray] = {}
    for hf_name, path_, transform, per_layer in _entries(config, params):
        array = np.asarray(jax.device_get(_get_path(params, path_))).astype(jnp.dtype(dtype))
        if per_layer:
            for i in range(config.num_layers):
                tensors[hf_name.format(i=i)] = np.ascontiguousarray(_to_flax(array[i], transform))
        else:
            tensors[hf_name] = np.ascontiguousarray(_to_flax(array, transform))
    paths.write_bytes(paths.path(path) / "model.safetensors", save_safetensors(tensors, metadata={"format": "pt"}))
    paths.write_text(paths.path(path) / "config.json", json.dumps(config_to_hf(config, dtype), indent=2))
