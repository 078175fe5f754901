"""FLOPs of one training step, counted from the shapes the code runs, and the peak they
are measured against (MFU in the training log; benchmarks/step_flops.py prints the count).

What one step computes (method/rollout.py): a base pass over B x N tokens, then
n_steps = (n_ahead - 1) + (n_ahead_talk - 1) thought steps, each feeding T = n_passes * K
tokens per row (K = N sites, fewer when training is gated) through every layer. A thought
query attends to all N base keys (masked, not skipped) plus the S = n_steps slots of its
own thought cache plus itself. The LM head runs on the base pass, the n_ahead - 3 sampling
steps and the n_ahead_talk talk steps (not on step n_ahead - 2); the mixing head on the
talk steps.

"model" FLOPs are forward + backward (3x forward), the convention MFU is quoted in.
"executed" adds what rematerialisation recomputes in the backward pass: the thought steps
(quiet_star.remat_steps), every layer again (model.remat, nested inside the former), and
the LM-head chunks (rows_in_chunks checkpoints each chunk once rows exceed the chunk);
with `rollout_impl="two_pass"`, the forward-only sampling scan instead of the step remat.

Peaks are per chip, dense bfloat16, from the vendors' spec sheets; on a CPU the peak is
measured (an f32 matmul, timed in the run that reports MFU), since CPUs differ several-fold.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig

# device_kind prefix -> peak FLOP/s per chip (bf16, dense)
PEAK_FLOPS_PER_CHIP = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e reports "TPU v5 lite"
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
)


def layer_matmul_params(m: ModelConfig) -> int:
    """Weights one token multiplies through in one layer: q, k, v, o and the SwiGLU MLP."""
    d, h, g, k, f = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size
    return d * h * k + 2 * d * g * k + h * k * d + 3 * d * f


def forward_flops(m: ModelConfig, qs: QuietStarConfig, batch: int, seq: int) -> dict[str, int]:
    """Forward FLOPs of one Quiet-STaR loss evaluation, by part (2 FLOPs per multiply-add)."""
    b, n, p, s = batch, seq, qs.n_passes, qs.n_steps
    t = p * qs.n_sites(n)  # thought queries per row (fewer under gated training)
    layers, heads, k = m.num_layers, m.num_heads, m.head_dim
    lm_head = 2 * m.hidden_size * m.vocab_size
    d = m.hidden_size
    mixing = 2 * (2 * d * d + d * d + d)
    head_steps = qs.n_sampled + qs.n_ahead_talk  # thought steps that apply the LM head
    return {
        "base_layers": 2 * layer_matmul_params(m) * layers * b * n,
        "base_attention": 4 * b * heads * n * n * k * layers,  # q.k and p.v over the full N x N
        "base_lm_head": lm_head * b * n,
        "thought_layers": 2 * layer_matmul_params(m) * layers * b * t * s,
        "thought_attention": 4 * b * heads * t * (n + s + 1) * k * layers * s,
        "thought_lm_head": lm_head * b * t * head_steps,
        "mixing_head": mixing * b * t * qs.n_ahead_talk,
    }


def step_flops(m: ModelConfig, qs: QuietStarConfig, batch: int, seq: int) -> dict[str, float]:
    fwd = forward_flops(m, qs, batch, seq)
    forward = sum(fwd.values())
    thought = fwd["thought_layers"] + fwd["thought_attention"] + fwd["thought_lm_head"] + fwd["mixing_head"]
    recompute = 0
    if qs.rollout_impl == "two_pass":
        # The forward-only sampling scan runs steps 1..n_ahead-3 and their LM head again;
        # the teacher-forced pass that is differentiated is not a scan, so no step remat.
        sampled_share = qs.n_sampled / qs.n_steps
        recompute += sampled_share * (fwd["thought_layers"] + fwd["thought_attention"])
        recompute += fwd["thought_lm_head"] * qs.n_sampled / (qs.n_sampled + qs.n_ahead_talk)
    elif qs.remat_steps:
        recompute += thought
    if m.remat:  # inside a rematerialised thought step the layers run once more still
        recompute += fwd["base_layers"] + fwd["base_attention"] + fwd["thought_layers"] + fwd["thought_attention"]
    chunked = qs.logits_chunk_rows > 0
    if chunked and batch * seq > qs.logits_chunk_rows:
        recompute += fwd["base_lm_head"]
    if chunked and batch * qs.n_passes * qs.n_sites(seq) > qs.logits_chunk_rows:
        recompute += fwd["thought_lm_head"]
    tokens_through_layers = batch * (seq + qs.n_passes * qs.n_sites(seq) * qs.n_steps)
    return {
        "forward_by_part": fwd,
        "forward": forward,
        "model_flops_per_step": 3 * forward,
        "executed_flops_per_step": 3 * forward + recompute,
        "token_passes_per_step": tokens_through_layers,
        "flops_per_token_pass": 3 * forward / tokens_through_layers,
        "six_n_per_token_pass": 6 * (layer_matmul_params(m) * m.num_layers + m.hidden_size * m.vocab_size),
    }


def lm_step_flops(m: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one plain next-token step (forward + backward)."""
    layers = 2 * layer_matmul_params(m) * m.num_layers * batch * seq
    attention = 4 * batch * m.num_heads * seq * seq * m.head_dim * m.num_layers
    return 3 * (layers + attention + 2 * m.hidden_size * m.vocab_size * batch * seq)


def train_step_cost(m: ModelConfig, qs: QuietStarConfig | None, batch: int, seq: int) -> tuple[float, int]:
    """(model FLOPs, token passes through the layers) of one optimizer step of `batch` x `seq`
    tokens: Quiet-STaR with `qs` (thought and talk tokens counted), else plain next-token."""
    if qs is None:
        return lm_step_flops(m, batch, seq), batch * seq
    counted = step_flops(m, qs, batch, seq)
    return counted["model_flops_per_step"], counted["token_passes_per_step"]


def measured_matmul_peak(size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` f32 `size`-square matmuls on the first local device."""
    x = jax.device_put(jnp.ones((size, size), jnp.float32), jax.local_devices()[0])
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of every device of the run together, where the figure comes from).

    CPU "devices" (forced host devices included) share one machine's cores, so a CPU run's
    peak is the measured matmul peak of each process's host.
    """
    kind = jax.devices()[0].device_kind
    if jax.default_backend() == "cpu":
        return measured_matmul_peak() * jax.process_count(), "measured f32 matmul"
    for prefix, per_chip in PEAK_FLOPS_PER_CHIP:
        if kind.startswith(prefix):
            return per_chip * jax.device_count(), f"{prefix} spec"
    return 0.0, f"unknown device {kind!r}"
