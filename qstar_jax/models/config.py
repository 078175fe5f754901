"""Model configuration: the architecture facts that decide what the LM computes.

`ModelConfig` mirrors the fields of a Hugging Face `config.json` for the Llama family
(llama, mistral, qwen2) under names that say what they are. It is a frozen dataclass so it
can be a static argument of `jax.jit` and a hashable attribute of Flax modules.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax

from qstar_jax import paths
from qstar_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: numerics checks, needs jax x64


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder LM.

    `dtype` is the compute dtype and `param_dtype` the storage dtype of the parameters;
    keeping float32 params with bfloat16 compute is the usual mixed-precision recipe.
    `sliding_window=None` means full causal attention (Mistral uses a window; a key at
    distance >= window from the query is invisible, as in transformers).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    # Layers per iteration of the layer scan: 1 keeps compile time flat in depth; unrolling
    # a shallow model removes the loop's per-layer slicing and stacking (faster on CPU).
    # Fully unrolled (>= num_layers), decoding also slices each layer weight once per call
    # rather than per token, at the cost of one copy of the layer weights (kv_cache.py).
    scan_unroll: int = 1

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise UserError(f"{name} must be one of {SUPPORTED_DTYPES}, got {getattr(self, name)!r}")
            if getattr(self, name) == "float64" and not jax.config.jax_enable_x64:
                raise UserError(f"{name} float64 needs 64-bit JAX (JAX_ENABLE_X64=1 or jax.enable_x64())")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)

    def save(self, path: str) -> None:
        paths.write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        return cls.from_dict(json.loads(paths.read_text(path, "model config")))
