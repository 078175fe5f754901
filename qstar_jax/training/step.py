"""The optimizer and the jitted Quiet-STaR train step (loss, grads, accumulation, update).

`train_step` is one pure function of (state, batch); `make_train_step`, the one builder of
every jitted step (Quiet-STaR, plain LM, NTP student), jits it with the state donated, so
parameters and optimizer state are updated in place on device.
Gradient accumulation runs inside the step as a `lax.scan` over micro-batches, so the
optimizer sees the mean gradient of the whole global batch in one update.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qstar_jax.models import sharding
from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.errors import UserError
from qstar_jax.models.transformer import Params, next_token_loss
from qstar_jax.method.ntp import NTPConfig, ntp_loss
from qstar_jax.method.loss import quiet_star_loss


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup; defaults are the official Quiet-STaR run's."""

    learning_rate: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.001
    grad_clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"  # after warmup: "constant", "linear" or "cosine" decay to 0
    total_steps: int = 100

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise UserError(f"optimizer.warmup_steps must be >= 0 and optimizer.total_steps >= 1, got "
                            f"{self.warmup_steps} and {self.total_steps}")
        # A NaN or negative learning rate (or a moment decay of 1) trains, and saves, garbage:
        # every float setting is checked here, before anything is loaded or compiled.
        for name, (low, low_allowed, high) in OPTIMIZER_RANGES.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > low or (low_allowed and value == low)) and value < high):
                interval = f"{'[' if low_allowed else '('}{low:g}, {high:g})"
                raise UserError(f"optimizer.{name} must be a finite number in {interval}, got {value!r}")


# Every float setting of the optimizer: (lowest value, whether it is allowed, upper bound, excluded).
OPTIMIZER_RANGES = {"learning_rate": (0.0, True, math.inf), "weight_decay": (0.0, True, math.inf),
                    "grad_clip_norm": (0.0, False, math.inf), "b1": (0.0, True, 1.0), "b2": (0.0, True, 1.0),
                    "eps": (0.0, False, math.inf)}


SCHEDULES = ("constant", "linear", "cosine")


def learning_rate_schedule(opt: OptimizerConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1))
    decay_steps = max(opt.total_steps - opt.warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(opt.learning_rate),
        "linear": optax.linear_schedule(opt.learning_rate, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(opt.learning_rate, decay_steps),
    }[opt.schedule]
    return optax.join_schedules([warmup, after], [opt.warmup_steps])


DECAYED_PARAM_NAMES = ("kernel", "embedding")


def decay_mask(params: Params) -> Any:
    """Weight decay on weight matrices only: not on biases, norm scales or thought embeddings.

    Decided by name, not rank: scanned layer params carry a leading layer axis, so a
    stacked bias or norm scale is 2-D too.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED_PARAM_NAMES, params)


SEPARATELY_CLIPPED = ("think_gate",)  # parts whose gradient must not change the others' clip factor


def clip_by_global_norm_per_part(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping, with the think gate's gradient clipped on its own: its regression
    gradient would otherwise change the factor that clips the LM, mixing head and thought
    embeddings (and theirs, at policy_loss_weight 1e6, would set the gate's step). Stateless
    like optax's, so checkpoints keep the same optimizer-state tree."""
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        del params
        parts = [k for k in SEPARATELY_CLIPPED if isinstance(updates, dict) and k in updates]
        if not parts:
            return clip.update(updates, state)
        clipped, _ = clip.update({k: v for k, v in updates.items() if k not in parts}, state)
        return {**clipped, **{k: clip.update(updates[k], state)[0] for k in parts}}, state

    return optax.GradientTransformation(clip.init, update)


def make_optimizer(opt: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping (the think gate on its own), then AdamW on the schedule,
    with weight decay on matrices and embeddings only (`decay_mask`)."""
    return optax.chain(
        clip_by_global_norm_per_part(opt.grad_clip_norm),
        optax.adamw(  # moments in float32 whatever the params' dtype: bf16 moments lose small updates
            learning_rate_schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
            mask=decay_mask, mu_dtype=jnp.float32,
        ),
    )


@flax.struct.dataclass
class TrainState:
    """Everything a step changes and a checkpoint holds: the step count, params, optimizer
    state and the run's rng (one key for the run; each step folds its count in)."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so checkpoints hold a plain array

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(d["step"], d["params"], d["opt_state"], d["rng"])


def init_train_state(params: Params, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """Step 0: the optimizer's initial state for `params` (jit it with out_shardings to build
    the state sharded, as the trainer does)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


# (params, tokens_BxN, segments_BxN, rng, *per-token inputs_BxN) -> (loss, metrics)
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def loss_fn_for(model_config: ModelConfig, qs: QuietStarConfig | None, ntp: NTPConfig | None = None) -> LossFn:
    """(params, tokens, segments, rng, ...) -> (loss, metrics): Quiet-STaR; plain next-token NLL
    when `qs` is None (base-model pretraining, control runs); with `ntp`, the Fast
    Quiet-STaR NTP student, whose extra input is the teacher's signal (ntp.teacher_batches)."""
    if ntp is not None:
        return lambda p, t, v, r, teacher: ntp_loss(model_config, ntp, p, t, v, r, teacher)
    if qs is None:
        return lambda p, t, v, r: next_token_loss(model_config, p, t, v)
    return lambda p, t, v, r: quiet_star_loss(model_config, qs, p, t, v, r)


def train_step(
    state: TrainState,
    tokens_AxBxN: jax.Array,
    segments_AxBxN: jax.Array,
    *inputs_AxBxN: jax.Array,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from A accumulated micro-batches of B sequences of N tokens.

    `inputs_AxBxN` are further per-token arrays the loss takes after the rng (the NTP
    stage's teacher NLL), split into micro-batches like the tokens.
    """
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(grads_sum, xs):
        index, tokens_BxN, segments_BxN, inputs_BxN = xs
        (_, metrics), grads = grad_fn(state.params, tokens_BxN, segments_BxN, jax.random.fold_in(step_rng, index),
                                      *inputs_BxN)
        return jax.tree.map(jnp.add, grads_sum, grads), metrics

    # Metrics leave the scan stacked (A, ...) rather than summed in the carry: a zero carry
    # would need their structure up front, i.e. one more trace of the whole loss.
    accum = tokens_AxBxN.shape[0]
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    grads, metrics_A = jax.lax.scan(
        micro, zero_grads, (jnp.arange(accum), tokens_AxBxN, segments_AxBxN, inputs_AxBxN)
    )
    grads = jax.tree.map(lambda g: g / accum, grads)
    metrics = jax.tree.map(lambda m: m.mean(0), metrics_A)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = TrainState(state.step + 1, params, opt_state, state.rng)
    metrics[FIRST_BAD_STATE] = first_bad_state(state.step, metrics["loss"], new_state)
    return new_state, metrics


# The metric naming the first state (steps done) that a checkpoint must not hold, by cause:
# [the loss computed from it is not finite, it is not finite itself]; NO_BAD_STATE: none.
FIRST_BAD_STATE = "first_bad_state"
NO_BAD_STATE = 2**31 - 1


def first_bad_state(steps_before: jax.Array, loss: jax.Array, new_state: TrainState) -> jax.Array:
    """[the state this step started from if the loss computed from it is not finite (finite
    but ruinous weights, e.g. a huge learning rate), the state it made if its params or
    optimizer state are not finite], NO_BAD_STATE where fine. One reduction over the state
    the update has just written, inside the jitted step, so the host learns it without
    reading the state back; `earliest_bad_state` keeps the first across steps."""
    state_finite = jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(
        (new_state.params, new_state.opt_state)) if jnp.issubdtype(leaf.dtype, jnp.inexact)]))
    return jnp.stack([jnp.where(jnp.isfinite(loss), NO_BAD_STATE, steps_before),
                      jnp.where(state_finite, NO_BAD_STATE, steps_before + 1)]).astype(jnp.int32)


earliest_bad_state = jax.jit(jnp.minimum)  # (so far, this step's) -> so far, on the device: no wait


def abstract_state_and_shardings(params_fn: Callable[[], Params], optimizer: optax.GradientTransformation, mesh):
    """The train state's shapes (no arrays built) and the shardings it lives in on `mesh`."""
    abstract_state = jax.eval_shape(lambda: init_train_state(params_fn(), optimizer, jax.random.key(0)))
    return abstract_state, sharding.state_shardings(abstract_state, optimizer, mesh)


def make_train_step(model_config: ModelConfig, qs: QuietStarConfig | None, optimizer: optax.GradientTransformation,
                    ntp: NTPConfig | None = None, state_shardings: Any = None, batch_sharding: Any = None):
    """The jitted train step, state donated: the one builder of training, tests and benchmarks.

    Quiet-STaR with `qs`, a plain LM when `qs` is None, the NTP student with `ntp` (whose
    step takes a third per-token input, the teacher's signal). With `state_shardings` and
    `batch_sharding` the state and inputs are pinned to them (a mesh run); without, jit
    places them (one device).
    """
    step = functools.partial(train_step, loss_fn=loss_fn_for(model_config, qs, ntp), optimizer=optimizer)
    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    n_inputs = 3 if ntp is not None else 2
    return jax.jit(step, in_shardings=(state_shardings,) + (batch_sharding,) * n_inputs,
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
