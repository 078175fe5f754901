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


@dataclasses.dataclass(frozen=True)
class QuietStarConfig:
    """Every Quiet-STaR knob, defaulting to the official code (ezelikman/quiet-star).

    Step counting follows the official code: step 0 is the base pass, steps 1..n_ahead-1
    feed the thought (start, n_ahead-3 sampled tokens, end), and the next
    n_ahead_talk-1 steps feed true tokens teacher-forced. The thought therefore holds
    n_ahead-1 tokens including start and end. See docs/method.md for every choice.
    """

    n_ahead: int = 12
    n_ahead_talk: int = 4
    n_passes: int = 2
    thought_temperature: float = 1.0
    reinforce_temperature: float = 3.0
    policy_loss_weight: float = 1e6
    base_loss_weight: float = 0.5  # the talk NLL gets 1 - base_loss_weight
    clip_negative_rewards: bool = True
    # False (official): the mixing weight w is used unsquashed. True: |w|, a deviation
    # that keeps a negative w from inverting the reward (docs/method.md, docs/toy_experiment.md).
    nonnegative_mixing_weight: bool = False
    embedding_scale: float = 100.0
    start_token_id: int = -1  # ids of <|startofthought|> / <|endofthought|>: never sampled
    end_token_id: int = -1
    remat_steps: bool = True  # recompute each thought step in the backward pass
    logits_chunk_rows: int = 512  # LM-head rows per chunk (<= 0: all at once); bounds V-sized memory
    # "parallel": per-position thought attention, O(N * (N + S)) per step. "dense_mask": the
    # official algorithm (every query against every thought key under an N x N*S mask),
    # O(N^2 * S) per step; kept to measure the gain and as a cross-check in tests.
    attention_impl: str = "parallel"
    # "two_pass": sample every thought in a forward-only scan, then differentiate one
    # teacher-forced pass over all thought steps at once. "scan": differentiate through the
    # step-by-step scan (the only way `attention_impl="dense_mask"` runs). Same results.
    rollout_impl: str = "scan"

    def __post_init__(self):
        if self.n_ahead < 3:
            raise UserError(f"n_ahead must be >= 3 (start + end + base step), got {self.n_ahead}")
        if self.n_ahead_talk < 1:
            raise UserError(f"n_ahead_talk must be >= 1, got {self.n_ahead_talk}")
        if self.n_passes < 1:
            raise UserError(f"n_passes must be >= 1, got {self.n_passes}")
        if self.thought_temperature <= 0 or self.reinforce_temperature <= 0:
            raise UserError("thought_temperature and reinforce_temperature must be > 0")
        if self.attention_impl not in ("parallel", "dense_mask"):
            raise UserError(f"attention_impl must be 'parallel' or 'dense_mask', got {self.attention_impl!r}")
        if self.rollout_impl not in ("scan", "two_pass"):
            raise UserError(f"rollout_impl must be 'scan' or 'two_pass', got {self.rollout_impl!r}")
        if self.rollout_impl == "two_pass" and self.attention_impl != "parallel":
            raise UserError("attention_impl='dense_mask' runs only with rollout_impl='scan'")
        if not 0.0 <= self.base_loss_weight <= 1.0:
            raise UserError(f"base_loss_weight must be in [0, 1], got {self.base_loss_weight}")

    @property
    def n_sampled(self) -> int:
        """Sampled tokens per thought (between start and end)."""
        return self.n_ahead - 3

    @property
    def n_steps(self) -> int:
        """Model calls after the base pass: the thought plus the teacher-forced talk inputs."""
        return self.n_ahead - 1 + self.n_ahead_talk - 1

    def replace(self, **changes: Any) -> "QuietStarConfig":
        return dataclasses.replace(self, **changes)
