"""Fast Quiet-STaR NTP: a thinking teacher trains a plain next-token student by RL.

The student is an ordinary LM (no thought tokens, one forward pass per generated token).
The teacher is a frozen Quiet-STaR model; per gold token x_{j+1} it supplies one float,
NLL_T = -log p_mix(x_{j+1} | x_<=j, one sampled thought), its post-thought prediction at
the first talk step (what it predicts at inference). Only the "kl" form needs more.

Three objectives (docs/method.md, "Fast Quiet-STaR NTP", has the derivation):

* "paper" (default): REINFORCE on the gold token,
      loss = -w * mean_j sg(A_j) * log p_S(x_{j+1} | x_<=j),  A_j = NLL_S - NLL_T,
  whose gradient is that of w/2 * (NLL_S - NLL_T)^2: every token's NLL moves toward
  the teacher's. (The literal -r * grad log p with r = NLL_T - NLL_S ascends that gap.)
* "code" (the public code): the action is sampled from the student,
      loss = -w * mean_j sg(max(r_j, 0)) * log softmax(z_j / tau)[a_j],  r_j = NLL_T - NLL_S,
  with w = 1e6 and tau = 3 there.
* "kl" (ours, neither paper nor code): distillation of the whole post-thought distribution,
      loss = w * mean_j KL(p_T(. | x_<=j, thought) || p_S(. | x_<=j)),
  with the teacher's distribution renormalised over the student's vocabulary; the
  teacher then supplies V floats per token instead of one.
Each may add nll_weight * mean NLL_S.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from qstar_jax.errors import UserError
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.rollout import rollout
from qstar_jax.method.sampling import sample_thought_tokens
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import Params, forward, next_token_mask, token_logp

FORMS = ("paper", "code", "kl")


@dataclasses.dataclass(frozen=True)
class NTPConfig:
    """Knobs of the NTP stage; defaults are the paper's form (docs/method.md)."""

    form: str = "paper"  # "paper" (REINFORCE on the gold token) | "code" (sampled action) | "kl"
    reward_weight: float = 1.0  # w; the public code uses 1e6 (at lr 1e-6)
    clip_negative_rewards: bool = False  # clamp the reward (code: r) at 0; the public code does
    reinforce_temperature: float = 3.0  # code form: log-probs of the sampled action at z / tau
    nll_weight: float = 0.0  # plus this times the student's plain NLL (neither paper nor code has one)
    teacher_passes: int = 1  # thoughts averaged per teacher NLL (the public code: 1)

    def __post_init__(self):
        if self.form not in FORMS:
            raise UserError(f"ntp.form must be one of {FORMS}, got {self.form!r}")
        if self.reinforce_temperature <= 0:
            raise UserError("ntp.reinforce_temperature must be > 0")
        if self.teacher_passes < 1:
            raise UserError(f"ntp.teacher_passes must be >= 1, got {self.teacher_passes}")


# ------------------------------------------------------------------------------ teacher


def teacher_config(qs: QuietStarConfig, ntp: NTPConfig) -> QuietStarConfig:
    """The teacher predicts as at inference: one talk step (the next token) per thought, a
    thought at every position (whatever share thought when it was trained)."""
    return qs.replace(n_ahead_talk=1, n_passes=ntp.teacher_passes, think_share=1.0)


def teacher_nll(config: ModelConfig, qs: QuietStarConfig, params: Params, tokens_BxN: jax.Array,
                segments_BxN: jax.Array, rng: jax.Array) -> jax.Array:
    """NLL_T of x_{j+1} at each position j (B x N; 0 where there is no real target).

    `qs` is already the teacher's (`teacher_config`); thoughts are sampled from `rng`.
    """
    r = rollout(config, qs, jax.lax.stop_gradient(params), tokens_BxN, segments_BxN, rng)
    logp_BxN = r.talk_logp_CxBxPxN[0].mean(axis=1)
    return jnp.where(r.target_valid_CxBxN[0], -logp_BxN, 0.0)


def teacher_distribution(config: ModelConfig, qs: QuietStarConfig, params: Params, tokens_BxN: jax.Array,
                         segments_BxN: jax.Array, rng: jax.Array, student_vocab: int) -> jax.Array:
    """log p_T(. | x_<=j, thought) over the student's `student_vocab` ids (B x N x V_S).

    The teacher's vocabulary holds the student's ids first (the thought tokens are appended,
    or sit in padding the student keeps); the distribution is renormalised over those ids.
    With several passes it is the mixture of the passes' distributions.
    """
    r = rollout(config, qs, jax.lax.stop_gradient(params), tokens_BxN, segments_BxN, rng, talk_distribution=True)
    logp_BxPxNxV = jax.nn.log_softmax(r.talk_logdist_BxPxNxV[..., :student_vocab], axis=-1)
    return jax.nn.logsumexp(logp_BxPxNxV, axis=1) - jnp.log(qs.n_passes)


def teacher_batches(config: ModelConfig, qs: QuietStarConfig, params: Params, tokens_AxBxN: jax.Array,
                    segments_AxBxN: jax.Array, rng: jax.Array, student_vocab: int | None = None) -> jax.Array:
    """The teacher's signal for A micro-batches, one at a time: NLL_T (A x B x N), or with
    `student_vocab` (the "kl" form) its distribution (A x B x N x V_S)."""
    def one(xs):
        index, tokens_BxN, segments_BxN = xs
        rng_i = jax.random.fold_in(rng, index)
        if student_vocab is None:
            return teacher_nll(config, qs, params, tokens_BxN, segments_BxN, rng_i)
        return teacher_distribution(config, qs, params, tokens_BxN, segments_BxN, rng_i, student_vocab)

    return jax.lax.map(one, (jnp.arange(tokens_AxBxN.shape[0]), tokens_AxBxN, segments_AxBxN))


# ------------------------------------------------------------------------------ student


class NTPTerms(NamedTuple):
    loss: jax.Array
    nll_student: jax.Array  # mean over real targets
    nll_teacher: jax.Array
    reward_BxM: jax.Array  # the weight on each log-prob (after clipping); "kl": the per-token KL; 0 where no target
    action_BxM: jax.Array  # the token whose log-prob is reinforced (gold, or sampled in "code")


def masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def ntp_terms(ntp: NTPConfig, logits_BxMxV: jax.Array, targets_BxM: jax.Array, mask_BxM: jax.Array,
              teacher_BxMx: jax.Array, uniform_BxM: jax.Array) -> NTPTerms:
    """The NTP objective from the student's logits at M positions and their gold targets.

    `teacher_BxMx` is NLL_T (B x M), or for the "kl" form the teacher's log-distribution
    (B x M x V). `uniform_BxM` picks the sampled action of the "code" form (inverse CDF of
    the student's softmax at temperature 1); the other forms ignore it.
    """
    nll_BxM = -token_logp(logits_BxMxV, targets_BxM)
    if ntp.form == "kl":
        return _kl_terms(ntp, logits_BxMxV, targets_BxM, mask_BxM, teacher_BxMx, nll_BxM)
    teacher_nll_BxM = teacher_BxMx
    gap_BxM = jax.lax.stop_gradient(nll_BxM) - teacher_nll_BxM  # > 0 where the teacher is better
    if ntp.form == "paper":
        reward_BxM, action_BxM = gap_BxM, targets_BxM
        logp_BxM = -nll_BxM
    else:
        reward_BxM = -gap_BxM  # the code's r = NLL_T - NLL_S
        b, m, v = logits_BxMxV.shape
        flat_logits = jax.lax.stop_gradient(logits_BxMxV).reshape(b * m, v)
        action_BxM = sample_thought_tokens(flat_logits, uniform_BxM.reshape(-1), 1.0).reshape(b, m)
        logp_BxM = token_logp(logits_BxMxV / ntp.reinforce_temperature, action_BxM)
    if ntp.clip_negative_rewards:
        reward_BxM = jnp.maximum(reward_BxM, 0.0)
    reward_BxM = jax.lax.stop_gradient(jnp.where(mask_BxM, reward_BxM, 0.0))
    nll_student = masked_mean(nll_BxM, mask_BxM)
    loss = -ntp.reward_weight * masked_mean(reward_BxM * logp_BxM, mask_BxM) + ntp.nll_weight * nll_student
    return NTPTerms(loss, nll_student, masked_mean(teacher_nll_BxM, mask_BxM), reward_BxM, action_BxM)


def _kl_terms(ntp: NTPConfig, logits_BxMxV, targets_BxM, mask_BxM, teacher_logp_BxMxV, nll_BxM) -> NTPTerms:
    """w * KL(p_T || p_S) per position: the student matches the whole post-thought
    distribution, not only its probability of the gold token."""
    chex.assert_equal_shape([logits_BxMxV, teacher_logp_BxMxV])
    student_logp_BxMxV = jax.nn.log_softmax(logits_BxMxV.astype(jnp.float32), axis=-1)
    teacher_p_BxMxV = jnp.exp(teacher_logp_BxMxV)
    kl_BxM = jnp.sum(teacher_p_BxMxV * (teacher_logp_BxMxV - student_logp_BxMxV), axis=-1)
    teacher_nll_BxM = -jnp.take_along_axis(teacher_logp_BxMxV, targets_BxM[..., None], axis=-1)[..., 0]
    nll_student = masked_mean(nll_BxM, mask_BxM)
    loss = ntp.reward_weight * masked_mean(kl_BxM, mask_BxM) + ntp.nll_weight * nll_student
    return NTPTerms(loss, nll_student, masked_mean(teacher_nll_BxM, mask_BxM),
                    jax.lax.stop_gradient(jnp.where(mask_BxM, kl_BxM, 0.0)), targets_BxM)


def ntp_loss(config: ModelConfig, ntp: NTPConfig, params: Params, tokens_BxN: jax.Array, segments_BxN: jax.Array,
             rng: jax.Array, teacher_BxNx: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and metrics of the student (plain LM params) on one micro-batch;
    `teacher_BxNx` is `teacher_batches`' output for it (NLL_T, or the "kl" distribution)."""
    logits_BxNxV, _ = forward(config, params, tokens_BxN, None, segments_BxN)
    mask_BxM = next_token_mask(segments_BxN)
    uniform_BxM = jax.random.uniform(rng, mask_BxM.shape)
    terms = ntp_terms(ntp, logits_BxNxV[:, :-1], tokens_BxN[:, 1:], mask_BxM, teacher_BxNx[:, :-1], uniform_BxM)
    metrics = {
        "loss": terms.loss,
        "nll_base": terms.nll_student,
        "nll_next": terms.nll_student,
        "nll_teacher": terms.nll_teacher,
        "teacher_gain": terms.nll_student - terms.nll_teacher,
        "reward": masked_mean(terms.reward_BxM, mask_BxM),
    }
    return terms.loss, metrics
