"""Quiet-STaR training: `python -m qstar_jax.train --config experiments/NAME.py --workdir DIR`.

Overrides: `--config.optimizer.learning_rate=2e-6`, `--config.steps=20`, ... Restarting the
same command resumes from the newest checkpoint in `--workdir` (same data position, same
rng: the result is bit-identical to an uninterrupted run). SIGTERM (preemption) saves a
checkpoint and exits 0. A non-finite loss stops the run before anything is saved.

`train_run` is one run: it starts or resumes the state, builds the data and the jitted
step, and hands them to a `Trainer`, whose loop only dispatches steps and runs hooks
(hooks.py: logging, evaluation, checkpointing, profiling). A config with
`curriculum.stages` runs a chain of such runs (Fast Quiet-STaR; see curriculum.py): each
stage starts from the previous stage's best checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.inference.evaluate import Evaluator
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.mixing import params_shape_fn
from qstar_jax.models import model_files, sharding
from qstar_jax.models.config import ModelConfig
from qstar_jax.tokenizer import Tokenizer
from qstar_jax.training import checkpoint, curriculum, data, flops, run_lock
from qstar_jax.training.batches import TOKENIZER_DOCUMENTS, Batches
from qstar_jax.training.resume import FRESH_START_SETTING, RunCheckpoints, restore_newest_readable, verified_start
from qstar_jax.training.hooks import (
    Evaluate,
    LogMetrics,
    Preemption,
    Profile,
    SaveCheckpoint,
    StepEnd,
    parse_eval_tasks,
)
from qstar_jax.training.metrics import MetricsLog, status
from qstar_jax.training.workdir import check_fresh_start, check_workdir
from qstar_jax.training.preflight import configured_mesh, device_capacity, run_preflight
from qstar_jax.training.setup import (
    check_method,
    init_distributed,
    load_base_model,
    load_teacher,
    ntp_config,
    optimizer_config,
    prepare_method,
    quiet_star_config,
    resumed_model,
    run_meta,
)
from qstar_jax.training.step import (
    FIRST_BAD_STATE,
    NO_BAD_STATE,
    TrainState,
    abstract_state_and_shardings,
    earliest_bad_state,
    init_train_state,
    learning_rate_schedule,
    loss_fn_for,
    make_optimizer,
    make_train_step,
)


class Trainer:
    """The training loop: dispatch a step, then run the hooks that are due after it.

    Steps are dispatched asynchronously; only a hook that reads a value (logging,
    evaluation, a checkpoint) waits for the device, so between those the host runs ahead.
    """

    def __init__(self, step_fn: Callable, inputs_at: Callable[[int], tuple], steps: int, checkpoint_every: int,
                 preempted: Preemption):
        self.step_fn, self.inputs_at, self.steps = step_fn, inputs_at, steps
        self.checkpoint_every, self.preempted = checkpoint_every, preempted
        self.hooks: list[tuple[Callable[[StepEnd], None], int, bool, bool]] = []

    def add_hook(self, hook: Callable[[StepEnd], None], every: int = 0, on_save: bool = False,
                 on_last: bool = False) -> None:
        """Runs `hook` after every `every`-th step (0: never by count), after steps that save a
        checkpoint (`on_save`), and after the last step (`on_last`); hooks run in this order."""
        self.hooks.append((hook, every, on_save, on_last))

    def run(self, state: TrainState, step: int) -> bool:
        """Trains from `step` to `steps`; False if a hook stopped the run (preemption)."""
        first_bad = np.full(2, NO_BAD_STATE, np.int32)
        while step < self.steps:
            state, metrics = self.step_fn(state, *self.inputs_at(step))
            first_bad = earliest_bad_state(first_bad, metrics.pop(FIRST_BAD_STATE))
            step += 1
            last = step == self.steps
            saving = step % self.checkpoint_every == 0 or last or self.preempted()
            end = StepEnd(step, state, metrics, last, saving, first_bad)
            for hook, every, on_save, on_last in self.hooks:
                if (every and step % every == 0) or (on_save and saving) or (on_last and last):
                    hook(end)
            if end.stop:
                return False
        return True


# Run settings that must be positive (>= 1), checked before anything is loaded or compiled:
# found any later, a 0 would cost a compile (checkpoint_every=0 divides by zero after the
# first step), or worse, finish "successfully" (steps=0, keep_checkpoints=0 keeps none).
POSITIVE_SETTINGS = ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
                     "eval_batches")


# Run settings that count something and may be 0 (0 = never, all, or the newest).
NON_NEGATIVE_SETTINGS = ("eval_every", "init_step", "data.max_documents", "data.eval_documents", "ntp.teacher_step")


def config_numbers(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, float]:
    """Every number in the config, by its dotted name."""
    numbers = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            numbers.update(config_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
    return numbers


def check_run_settings(cfg: ml_collections.ConfigDict) -> None:
    numbers = config_numbers(cfg)
    for name, value in numbers.items():  # a NaN passes every comparison below
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
    for name in POSITIVE_SETTINGS:
        if numbers[name] < 1:
            raise UserError(f"{name} must be >= 1, got {numbers[name]}")
    for name in NON_NEGATIVE_SETTINGS:
        if numbers[name] < 0:
            raise UserError(f"{name} must be >= 0 (0 = never, all or the newest), got {numbers[name]}")
    if cfg.profile_steps < 0 or cfg.profile_after < 0:
        raise UserError(f"profile_steps and profile_after must be >= 0, got {cfg.profile_steps}, {cfg.profile_after}")
    if cfg.data.seq_len < 2:
        raise UserError(f"data.seq_len must be >= 2 (a token and its successor), got {cfg.data.seq_len}")
    talks = [("quiet_star.n_ahead_talk", cfg.quiet_star.n_ahead_talk)] if cfg.method == "quiet_star" else []
    talks += [(f"curriculum stage {s.get('name')!r}'s n_ahead_talk", s["n_ahead_talk"])
              for s in cfg.curriculum.stages if s.get("n_ahead_talk") is not None]
    # The official policy positions end one position before the last whole talk horizon.
    margin = 2 if cfg.quiet_star.get("policy_positions", "official") == "official" else 1
    for name, talk in talks:  # found later, a shape error after a compile, or thoughts never rewarded
        if cfg.data.seq_len < talk + margin:
            raise UserError(f"data.seq_len ({cfg.data.seq_len}) must be at least {name} ({talk}) + {margin} under "
                            f"policy_positions={cfg.quiet_star.get('policy_positions', 'official')!r}: "
                            "no position would be scored, so no thought could be rewarded")
    # The option dataclasses check their own values; building them here makes those
    # checks run before the workdir is locked or anything is written there.
    optimizer_config(cfg)
    ntp_config(cfg)
    QuietStarConfig(**cfg.quiet_star.to_dict())


def train(cfg: ml_collections.ConfigDict, workdir: str, preflight_only: bool = False,
          topology: str | None = None) -> None:
    """One training run, or with `curriculum.stages` the whole chain of them; with
    `preflight_only` the memory pre-flight instead (on a TPU `topology`'s abstract chips if given)."""
    check_run_settings(cfg)
    if cfg.profile_steps and paths.is_remote(workdir):
        raise UserError(f"profile_steps writes a local trace; --workdir {workdir} is in a bucket (profile a local run)")
    if workdir and not preflight_only:
        check_workdir(workdir)
    init_distributed(cfg.distributed)
    if cfg.compilation_cache_dir:
        # JAX keys entries by program, compiler options and versions, so a stale hit cannot happen.
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
    if preflight_only:
        print(json.dumps(run_preflight(cfg, make_optimizer(optimizer_config(cfg)), topology)))
        return
    if cfg.init_from and not has_started(workdir) and not paths.path(cfg.init_from).is_dir():
        raise UserError(f"init_from directory does not exist: {cfg.init_from} (convert a HF checkpoint with "
                        f"python -m qstar_jax.convert --hf-checkpoint HF_DIR --output {cfg.init_from})")
    with run_lock.held(workdir):  # one run per workdir, before anything is written there
        if cfg.curriculum.stages:
            preempted = Preemption()
            curriculum.run_chain(cfg, workdir, functools.partial(train_run, preempted=preempted))
        else:
            train_run(cfg, workdir)


def has_started(workdir: str) -> bool:
    """Whether a run (or a curriculum chain) already checkpointed here: it resumes from its
    own checkpoints and never reads init_from again."""
    root = paths.path(workdir)
    return any((root / sub).is_dir() for sub in (checkpoint.CHECKPOINTS_DIR, "stages"))


class RunStart(NamedTuple):
    """Where a run starts: its model, method, tokenizer and state (fresh or restored)."""

    model_config: ModelConfig
    qs: QuietStarConfig | None
    tokenizer: Tokenizer
    state: TrainState
    state_shardings: Any
    meta: dict[str, Any]
    step: int


def start_or_resume(cfg: ml_collections.ConfigDict, workdir: str, mesh, optimizer, ckpt: RunCheckpoints,
                    train_docs) -> RunStart:
    """The state at the newest verified checkpoint, or built from `init_from` (or a random
    init) at step 0, with the model files written beside the checkpoints."""
    clock = time.perf_counter()
    moved: list[str] = []  # steps set aside as unusable
    start_step = verified_start(ckpt, moved)
    if start_step is None:
        check_fresh_start(workdir, cfg[FRESH_START_SETTING])
        model_config, params, tokenizer = load_base_model(
            cfg, data.leading_documents(train_docs, TOKENIZER_DOCUMENTS), workdir, mesh)
        model_config, qs, params, tokenizer = prepare_method(cfg, model_config, params, tokenizer)
        _, state_shardings = abstract_state_and_shardings(lambda p=params: p, optimizer, mesh)
        state = jax.jit(lambda p: init_train_state(p, optimizer, jax.random.key(cfg.seed)),
                        out_shardings=state_shardings)(params)
        del params
        model_files.save_model_files(workdir, model_config, tokenizer)  # for resume, evaluate, generate
        status(f"loaded model from {cfg.init_from or 'a random init'} in {time.perf_counter() - clock:.1f} s")
        return RunStart(model_config, qs, tokenizer, state, state_shardings, run_meta(model_config, qs, cfg), 0)
    check_method(cfg.method)
    model_config, tokenizer = resumed_model(cfg, workdir)
    qs = quiet_star_config(cfg, tokenizer)
    meta = run_meta(model_config, qs, cfg)
    abstract_state, state_shardings = abstract_state_and_shardings(params_shape_fn(model_config, qs), optimizer, mesh)
    state, start_step = restore_newest_readable(ckpt, start_step, abstract_state, state_shardings, meta,
                                                len(train_docs), cfg.allow_config_change, moved)
    for line in moved:
        status(f"warning: checkpoint at {line}; resuming from step {start_step}")
    status(f"resumed from step {start_step} in {workdir} ({time.perf_counter() - clock:.1f} s)")
    return RunStart(model_config, qs, tokenizer, state, state_shardings, meta, start_step)


class RunData(NamedTuple):
    """The run's training batches (with the NTP teacher's signal) and held-out batches."""

    batches: Batches
    inputs_at: Callable[[int], tuple]  # step -> the train step's per-token inputs
    eval_batches: list[tuple]
    input_shapes: list[jax.ShapeDtypeStruct]  # what the step is compiled for


def run_data(cfg: ml_collections.ConfigDict, run: RunStart, train_docs, eval_docs, mesh) -> RunData:
    """Rows of the training documents in the run's order (a pure function of seed and step),
    the fixed held-out batches, and with method=ntp the teacher that scores each batch."""
    clock = time.perf_counter()
    batches = Batches(data.Rows(train_docs, run.tokenizer, cfg.data.seq_len, cfg.seed, cfg.data.packing),
                      cfg.grad_accum, cfg.batch_size, mesh)
    status(f"data: {len(train_docs)} training documents ({'packed' if cfg.data.packing else 'one per row'}), "
           f"{len(eval_docs)} held out (opened in {time.perf_counter() - clock:.1f} s)")
    teacher = load_teacher(cfg, mesh, batches.sharding, run.model_config.vocab_size) if cfg.method == "ntp" else None

    def inputs_at(source: Batches, step: int, rng_seed: int) -> tuple:
        """(tokens, segments) of a step, plus the teacher's signal on them for the NTP student."""
        tokens, segments = source(step)
        if teacher is None:
            return tokens, segments
        return tokens, segments, teacher(tokens, segments, jax.random.fold_in(jax.random.key(rng_seed), step))

    eval_batches = []
    if len(eval_docs) and cfg.eval_every > 0:
        eval_rows = data.Rows(eval_docs, run.tokenizer, cfg.data.seq_len, cfg.seed + 1, cfg.data.packing)
        eval_source = Batches(eval_rows, 1, batches.micro, mesh)
        eval_batches = [inputs_at(eval_source, i, cfg.seed + 4) for i in range(cfg.eval_batches)]
    shapes = [jax.ShapeDtypeStruct(batches.shape, jnp.int32, sharding=batches.sharding)] * 2
    if teacher is not None:  # NLL_T per token, or ("kl") a distribution over the vocabulary per token
        per_token = (run.model_config.vocab_size,) if cfg.ntp.form == "kl" else ()
        shapes.append(jax.ShapeDtypeStruct(batches.shape + per_token, jnp.float32, sharding=batches.sharding))
    return RunData(batches, functools.partial(inputs_at, batches, rng_seed=cfg.seed + 3), eval_batches, shapes)


# XLA:CPU's concurrency-optimised scheduler lets the CPU "devices" of one process issue
# independent collectives in different orders: a sharded two_pass step (8 CPU devices, data 2
# x fsdp 4) deadlocked on an all-reduce over 4 devices against a collective-permute over 8 in
# each of 7 runs with it on, and gave one device's losses in each of 4 with it off. Across
# processes (gloo) the opposite held: with it off, the 2-process pod rehearsal (scan rollout)
# hung at its first step. So it is turned off for single-process two_pass runs only.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def two_pass_run(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.method == "quiet_star" and cfg.quiet_star.rollout_impl == "two_pass"


def order_cpu_collectives(cfg: ml_collections.ConfigDict) -> None:
    """For a single-process two_pass run, XLA_FLAGS turns the scheduler off (unless XLA_FLAGS
    sets it already). Call before JAX starts a backend: XLA reads its flags once."""
    flags = os.environ.get("XLA_FLAGS", "")
    if two_pass_run(cfg) and cfg.distributed.mode != "on" and CPU_SCHEDULER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()


def check_two_pass_mesh(cfg: ml_collections.ConfigDict, mesh) -> None:
    """two_pass on several CPU devices runs in one process with the scheduler off, or not at all."""
    if not two_pass_run(cfg) or mesh.size == 1 or mesh.devices.flat[0].platform != "cpu":
        return
    if jax.process_count() > 1:
        raise UserError("quiet_star.rollout_impl='two_pass' on the CPU devices of several processes is not "
                        "supported (its XLA:CPU setting hangs multi-process runs); use rollout_impl='scan'")
    if f"{CPU_SCHEDULER_FLAG}=false" not in os.environ.get("XLA_FLAGS", ""):
        raise UserError(f"quiet_star.rollout_impl='two_pass' on {mesh.size} CPU devices needs "
                        f"{CPU_SCHEDULER_FLAG}=false in XLA_FLAGS (qstar_jax/training/trainer.py says why); "
                        "use rollout_impl='scan' or drop your setting")


def run_mesh(cfg: ml_collections.ConfigDict, optimizer):
    """The configured device mesh (or with mesh.auto the chooser's), refused where the
    configured rollout would deadlock on it."""
    devices = jax.devices()
    mesh = configured_mesh(cfg, devices, device_capacity(devices[0]), optimizer)
    check_two_pass_mesh(cfg, mesh)
    return mesh


def add_hooks(trainer: Trainer, cfg: ml_collections.ConfigDict, workdir: str, run: RunStart, ckpt: RunCheckpoints,
              log: MetricsLog, eval_batches: list, train_documents: int,
              selection: curriculum.Selection | None) -> None:
    """Logging, evaluation, checkpointing and profiling, in the order they must run."""
    task_sets = parse_eval_tasks(cfg.eval_tasks)  # read and checked even when evaluation is off
    step_flops, token_passes = flops.train_step_cost(run.model_config, run.qs, cfg.batch_size, cfg.data.seq_len)
    peak, peak_source = flops.peak_flops()  # the NTP student's cost only (not its teacher's forward pass)
    status(f"{step_flops:.3g} model FLOPs per step; peak {peak:.3g} FLOP/s ({peak_source})")
    learning_rate = learning_rate_schedule(optimizer_config(cfg))
    trainer.add_hook(LogMetrics(log, ckpt, learning_rate, run.step, cfg.batch_size * cfg.data.seq_len, token_passes,
                                step_flops, peak), every=cfg.log_every, on_save=True)
    if cfg.eval_every > 0:
        loss_fn = loss_fn_for(run.model_config, run.qs, ntp_config(cfg) if cfg.method == "ntp" else None)
        eval_fn = jax.jit(lambda p, t, v, *x: loss_fn(p, t, v, jax.random.key(cfg.seed + 2), *x)[1])
        evaluator_of = lambda params: Evaluator(run.model_config, run.qs, params, run.tokenizer, run.qs is not None)
        pick = None if selection is None else functools.partial(curriculum.selection_metric, name=selection.metric)
        trainer.add_hook(Evaluate(log, eval_fn, eval_batches, task_sets, evaluator_of, pick),
                         every=cfg.eval_every, on_last=True)
    trainer.add_hook(SaveCheckpoint(ckpt, run.meta, train_documents, trainer.preempted), on_save=True)
    if cfg.profile_steps > 0:
        first = max(run.step + 1, cfg.profile_after)
        trainer.add_hook(Profile(str(paths.path(workdir) / "profile"), first, cfg.profile_steps), every=1)


def train_run(cfg: ml_collections.ConfigDict, workdir: str, selection: curriculum.Selection | None = None,
              preempted: Preemption | None = None) -> bool:
    """Trains `cfg.steps` steps in `workdir` (resuming there); False if preempted first.

    With `selection`, every checkpoint carries that evaluation metric and the best one is
    kept whatever `keep_checkpoints` says (a curriculum stage picks it for the next stage).
    """
    preempted = preempted or Preemption()  # stop signals from here on lose nothing (hooks.Preemption)
    optimizer = make_optimizer(optimizer_config(cfg))
    mesh = run_mesh(cfg, optimizer)
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    train_docs, eval_docs = data.split_documents(data.load_documents(cfg.data), cfg.data.eval_documents)
    ckpt = RunCheckpoints(str(paths.path(workdir) / checkpoint.CHECKPOINTS_DIR), cfg.keep_checkpoints,
                          best_mode=None if selection is None else selection.mode)
    run = start_or_resume(cfg, workdir, mesh, optimizer, ckpt, train_docs)
    sharding.check_mesh_divides(mesh, cfg.batch_size // cfg.grad_accum, run.model_config.num_heads,
                                run.model_config.num_kv_heads)
    run_inputs = run_data(cfg, run, train_docs, eval_docs, mesh)
    clock = time.perf_counter()
    step_fn = make_train_step(run.model_config, run.qs, optimizer, ntp_config(cfg) if cfg.method == "ntp" else None,
                              run.state_shardings, run_inputs.batches.sharding)
    step_fn = step_fn.lower(run.state, *run_inputs.input_shapes).compile()
    status(f"compiled the train step in {time.perf_counter() - clock:.1f} s")
    if preempted.before_first_step(ckpt.latest_step()):
        return False
    trainer = Trainer(step_fn, run_inputs.inputs_at, cfg.steps, cfg.checkpoint_every, preempted)
    log = MetricsLog(workdir, cfg.steps, run.step, cfg.wandb_project, cfg.to_dict())
    add_hooks(trainer, cfg, workdir, run, ckpt, log, run_inputs.eval_batches, len(train_docs), selection)
    finished = trainer.run(run.state, run.step)
    ckpt.wait()
    log.close()
    return finished
