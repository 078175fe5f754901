"""Quiet-STaR configuration: every knob of the method (thinking, talking, learning)."""

from __future__ import annotations

import dataclasses
from typing import Any

from qstar_jax.errors import UserError

THINK_GATES = ("", "linear", "mlp")
# Which positions REINFORCE scores (docs/method.md, "Policy positions"). "official": as the
# official code, j <= N-2-C in a row of N tokens (C = n_ahead_talk), and only where every talk
# target is real text. "full_horizon": also j = N-1-C, the last position whose whole talk
# horizon lies inside the row (this implementation's rule before it followed the official one).
POLICY_POSITIONS = ("official", "full_horizon")


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
    policy_positions: str = "official"  # see POLICY_POSITIONS
    # A control, not a method: the baselined rewards are permuted at random across the batch's
    # scored (row, position) pairs before REINFORCE, so thoughts are reinforced by rewards with
    # the same distribution but no relation to what they did (docs/toy_experiment.md).
    shuffle_rewards: bool = False
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
    # A think gate (not in the papers; docs/method.md): "linear" or "mlp", a head on the base
    # hidden state at j trained to predict the talk gain a thought at j brings, so that
    # generation can think only where it pays. "" = no gate (no parameters, no cost).
    think_gate: str = ""
    think_gate_loss_weight: float = 1.0
    # Gated training: the share of each row's positions that think (1.0: all, as the papers).
    # Below 1, the think gate's top-ranked positions think, plus `think_explore` of them
    # drawn at random (all of them random without a gate, or with think_explore = 1).
    think_share: float = 1.0
    think_explore: float = 0.1

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
        if self.policy_positions not in POLICY_POSITIONS:
            raise UserError(f"policy_positions must be one of {', '.join(map(repr, POLICY_POSITIONS))}, "
                            f"got {self.policy_positions!r}")
        if self.think_gate not in THINK_GATES:
            raise UserError(f"think_gate must be one of {', '.join(map(repr, THINK_GATES))}, got {self.think_gate!r}")
        if not 0.0 < self.think_share <= 1.0 or not 0.0 <= self.think_explore <= 1.0:
            raise UserError(f"think_share must be in (0, 1] and think_explore in [0, 1], got {self.think_share} "
                            f"and {self.think_explore}")
        if self.think_gate_loss_weight < 0:
            raise UserError(f"think_gate_loss_weight must be >= 0, got {self.think_gate_loss_weight}")
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

    def n_sites(self, n: int) -> int:
        """Positions per row of `n` that think: all of them, or `think_share` of them (>= 1)."""
        return n if self.think_share >= 1.0 else max(1, round(self.think_share * n))

    def replace(self, **changes: Any) -> "QuietStarConfig":
        return dataclasses.replace(self, **changes)
