"""Quiet-STaR training: `python -m qstar_jax.train --config experiments/NAME.py --workdir DIR`.

Overrides: `--config.optimizer.learning_rate=2e-6`, `--config.steps=20`, ... Restarting the
same command resumes from the newest checkpoint in `--workdir` (same data position, same
rng: the result is bit-identical to an uninterrupted run). SIGTERM (preemption) saves a
checkpoint and exits 0. A non-finite loss stops the run before anything is saved.

A config with `curriculum.stages` runs a chain of such runs (Fast Quiet-STaR; see
curriculum.py): each stage starts from the previous stage's best checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from qstar_jax import paths
from qstar_jax.training import checkpoint
from qstar_jax.models import model_files
from qstar_jax.training import curriculum
from qstar_jax.training import data
from qstar_jax.training import flops
from qstar_jax.models import hf
from qstar_jax.method import ntp
from qstar_jax.training import run_lock
from qstar_jax.models import sharding
from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.inference.evaluate import Evaluator
from qstar_jax.inference.evaluate import evaluate as evaluate_examples
from qstar_jax.training.metrics import MetricsLog
from qstar_jax.models.transformer import Params, init_params
from qstar_jax.models.vocab import grow_vocab, truncate_vocab
from qstar_jax.method.mixing import init_quiet_star_params
from qstar_jax.inference.tasks import load_examples
from qstar_jax.tokenizer import (
    END_THOUGHT,
    START_THOUGHT,
    Tokenizer,
    add_thought_tokens,
    load_tokenizer,
    remove_thought_tokens,
    train_bpe_tokenizer,
    train_word_tokenizer,
)
from qstar_jax.training.step import (
    OptimizerConfig,
    TrainState,
    init_train_state,
    learning_rate_schedule,
    loss_fn_for,
    make_optimizer,
    train_step,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the trained model")
_PREFLIGHT = flags.DEFINE_bool("preflight", False, "compile the train step for the configured shapes "
                               "on abstract inputs, report per-device memory, and exit")

THOUGHT_INIT_TEXT = "---"  # the official init of the start/end thought embeddings
# Model settings a run decides even when the weights come from init_from (the rest is the
# checkpoint's architecture), and the ones a random init takes from its tokenizer.
RUN_MODEL_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll")
TOKENIZER_MODEL_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id")


# ----------------------------------------------------------------------------- runtime


def init_distributed(cfg: ml_collections.ConfigDict) -> None:
    """JAX's multi-controller runtime: TPU pods configure themselves, elsewhere say where."""
    if cfg.mode == "off":
        return
    if cfg.mode == "on":
        # Cross-process collectives for CPU devices (GPU/TPU use their own); harmless elsewhere.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address or None,
            num_processes=cfg.num_processes if cfg.coordinator_address else None,
            process_id=cfg.process_id if cfg.coordinator_address else None,
        )
        return
    if cfg.mode != "auto":
        raise UserError(f"distributed.mode must be auto, on or off, got {cfg.mode!r}")
    try:  # TPU pods and SLURM/MPI jobs are detected; a single machine is not an error
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
        logging.info("single-process run (jax.distributed not initialised: %s)", str(e).splitlines()[0])


def dataclass_from(cls, values: ml_collections.ConfigDict, **extra):
    return cls(**{**values.to_dict(), **extra})


def ntp_config(cfg: ml_collections.ConfigDict) -> ntp.NTPConfig:
    """The NTP loss knobs (config.ntp also names the teacher run)."""
    return ntp.NTPConfig(**{f.name: cfg.ntp[f.name] for f in dataclasses.fields(ntp.NTPConfig)})


# --------------------------------------------------------------------------------- model


def load_base_model(cfg: ml_collections.ConfigDict, documents: list[str], workdir: str, mesh):
    """(model config, params, tokenizer) from init_from, or a random init and new tokenizer.

    Params arrive sharded on `mesh` in `model.param_dtype` (float32 master weights even from
    a bfloat16 checkpoint): every source is read shard by shard into its target sharding.
    init_from may also be a training workdir (checkpoint `init_step`, 0 = newest): then
    the params are a Quiet-STaR run's (thought embeddings and mixing head included) or a
    plain LM run's, and `prepare_method` adapts them to `cfg.method`.
    """
    param_dtype = cfg.model.param_dtype
    if cfg.init_from:
        path = cfg.init_from
        if checkpoint.is_training_dir(path):
            model_config, _, params, tokenizer = checkpoint.load_for_inference(path, cfg.init_step or None, mesh,
                                                                               param_dtype)
            if cfg.tokenizer:
                raise UserError("tokenizer must be empty when init_from is a training directory (its tokenizer is used)")
        elif model_files.is_model_dir(path):
            model_config, params = model_files.load_model(path, mesh, param_dtype)
            tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else model_files.load_model_tokenizer(path)
        else:
            model_config, params = hf.load_hf_model(path, param_dtype, mesh)
            tokenizer = load_tokenizer(cfg.tokenizer or path)
        return model_config.replace(**{k: cfg.model[k] for k in RUN_MODEL_FIELDS}), params, tokenizer
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif cfg.tokenizer_type == "bpe":
        tokenizer = train_bpe_tokenizer(documents, cfg.tokenizer_vocab_size, str(paths.path(workdir) / "bpe"))
    elif cfg.tokenizer_type == "word":
        tokenizer = train_word_tokenizer(documents, str(paths.path(workdir) / "words"))
    else:
        raise UserError(f"tokenizer_type must be 'bpe' or 'word', got {cfg.tokenizer_type!r}")
    model_config = dataclass_from(
        ModelConfig, cfg.model, vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
    )
    init = functools.partial(init_params, model_config)
    shardings = sharding.param_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
    return model_config, jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed)), tokenizer


def resumed_model(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[ModelConfig, Tokenizer]:
    """The model config and tokenizer a run recorded in its workdir at its first start.

    A resumed run reads these instead of `init_from` (which may be gone, and would cost a
    full weight load); what this config decides is laid over them, so the checkpoint check
    still catches a changed architecture.
    """
    saved = ModelConfig.load(str(paths.path(workdir) / model_files.MODEL_CONFIG_FILE))
    decided = RUN_MODEL_FIELDS if cfg.init_from else tuple(
        f.name for f in dataclasses.fields(ModelConfig) if f.name in cfg.model and f.name not in TOKENIZER_MODEL_FIELDS)
    return saved.replace(**{k: cfg.model[k] for k in decided}), model_files.load_model_tokenizer(workdir)


def add_thoughts(model_config: ModelConfig, params: Params, tokenizer: Tokenizer, cfg) -> tuple:
    """Adds the thought tokens, grows the vocab, and builds the Quiet-STaR params."""
    init_id = tokenizer.encode(THOUGHT_INIT_TEXT)[0]
    init_D = jnp.asarray(params["embed_tokens"]["embedding"][init_id], jnp.float32)
    start_id, end_id = add_thought_tokens(tokenizer)
    vocab = max(model_config.vocab_size, end_id + 1)
    model_config, params = grow_vocab(model_config, params, vocab, {start_id: init_D, end_id: init_D})
    qs = dataclass_from(QuietStarConfig, cfg.quiet_star, start_token_id=start_id, end_token_id=end_id)
    params = init_quiet_star_params(model_config, qs, params, init_D, jax.random.key(cfg.seed + 1))
    return model_config, qs, params


def reinit_thoughts(params: Params, tokenizer: Tokenizer, qs: QuietStarConfig) -> Params:
    """Start/end embeddings back to the embedding of "---" and the mixing head's last layer
    back to zero (w = 0: the mixed prediction is the base one again), keeping the LM and
    the head's other layers: what Fast Quiet-STaR's public code does at every stage."""
    embedding_VxD = params["lm"]["embed_tokens"]["embedding"]
    init_D = embedding_VxD[tokenizer.encode(THOUGHT_INIT_TEXT)[0]].astype(jnp.float32)
    stored_D = (init_D / qs.embedding_scale).astype(params["thought"]["start"].dtype)
    mixing = dict(params["mixing_head"])
    mixing["out"] = jax.tree.map(jnp.zeros_like, mixing["out"])
    return {**params, "thought": {"start": stored_D, "end": jnp.copy(stored_D)}, "mixing_head": mixing}


def strip_thoughts(model_config: ModelConfig, params: Params, tokenizer: Tokenizer) -> tuple:
    """The plain LM inside Quiet-STaR params, with a tokenizer without the thought tokens.

    The thought tokens' embedding / LM-head rows are dropped when they are the vocab's last
    two (we grew it for them); inside a padded vocab (Qwen2.5) they stay as unused rows.
    """
    ids = sorted((tokenizer.token_id(START_THOUGHT), tokenizer.token_id(END_THOUGHT)))
    lm = params["lm"]
    if ids == [model_config.vocab_size - 2, model_config.vocab_size - 1]:
        model_config, lm = truncate_vocab(model_config, lm, ids[0])
    return model_config, lm, remove_thought_tokens(tokenizer)


def prepare_method(cfg, model_config: ModelConfig, params: Params, tokenizer: Tokenizer) -> tuple:
    """(model config, QuietStarConfig or None, params, tokenizer) for `cfg.method`.

    quiet_star: thought tokens and params are added, or kept when init_from already has
    them (a curriculum stage continues its predecessor's thoughts and mixing head, whose
    shapes do not depend on n_ahead), unless `curriculum.reinit_thoughts` starts them over.
    lm / ntp: a plain LM, thought parts removed.
    """
    check_method(cfg.method)
    has_thoughts = "thought" in params
    if cfg.method == "quiet_star":
        if not has_thoughts:
            return (*add_thoughts(model_config, params, tokenizer, cfg), tokenizer)
        qs = quiet_star_config(cfg, tokenizer)
        if cfg.curriculum.reinit_thoughts:
            params = reinit_thoughts(params, tokenizer, qs)
        return model_config, qs, params, tokenizer
    if has_thoughts:
        model_config, params, tokenizer = strip_thoughts(model_config, params, tokenizer)
    return model_config, None, params, tokenizer


def check_method(method: str) -> None:
    if method not in ("quiet_star", "lm", "ntp"):
        raise UserError(f"method must be 'quiet_star', 'lm' or 'ntp', got {method!r}")


def quiet_star_config(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> QuietStarConfig | None:
    """The run's QuietStarConfig (thought ids from its tokenizer), None for a plain LM."""
    if cfg.method != "quiet_star":
        return None
    return dataclass_from(QuietStarConfig, cfg.quiet_star, start_token_id=tokenizer.token_id(START_THOUGHT),
                          end_token_id=tokenizer.token_id(END_THOUGHT))


def params_shape_fn(model_config: ModelConfig, qs: QuietStarConfig | None):
    """A function whose `jax.eval_shape` is the run's params: the LM, plus thought parts."""
    def params():
        lm = init_params(model_config, jax.random.key(0))
        if qs is None:
            return lm
        return init_quiet_star_params(model_config, qs, lm, jnp.zeros((model_config.hidden_size,)), jax.random.key(1))
    return params


def load_teacher(cfg: ml_collections.ConfigDict, mesh, batch_sharding, student_vocab: int):
    """The NTP stage's frozen thinking teacher, as `(tokens, segments, rng) -> signal`: NLL_T
    (A x B x N), or for ntp.form "kl" its distribution over the student's vocab (A x B x N x V)."""
    path = cfg.ntp.teacher
    if not path or not checkpoint.is_training_dir(path):
        raise UserError(f"method=ntp needs ntp.teacher = a Quiet-STaR training directory, got {path!r}")
    config, qs, params, _ = checkpoint.load_for_inference(path, cfg.ntp.teacher_step or None, mesh)
    if qs is None:
        raise UserError(f"ntp.teacher {path} is a plain LM run; the teacher must think (method=quiet_star)")
    shardings = jax.tree.map(lambda x: x.sharding, params)
    knobs = ntp_config(cfg)
    signal = jax.jit(functools.partial(ntp.teacher_batches, config, ntp.teacher_config(qs, knobs),
                                       student_vocab=student_vocab if knobs.form == "kl" else None),
                     in_shardings=(shardings, batch_sharding, batch_sharding, None), out_shardings=batch_sharding)
    return lambda tokens, segments, rng: signal(params, tokens, segments, rng)


# The settings besides the architecture that decide what a run computes; a checkpoint
# records them, and a resume that changes one is refused unless allow_config_change.
RESULT_SETTINGS = ("method", "seed", "batch_size", "grad_accum", "quiet_star", "ntp", "data", "optimizer")


def result_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    settings = {k: cfg[k].to_dict() if isinstance(cfg[k], ml_collections.ConfigDict) else cfg[k]
                for k in RESULT_SETTINGS}
    return json.loads(json.dumps(settings))  # as a checkpoint stores them (tuples become lists)


def changed_settings(saved: Any, current: Any, name: str = "") -> list[str]:
    """'key: saved -> current' for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for key in sorted(set(saved) | set(current))
                for change in changed_settings(saved.get(key), current.get(key), f"{name}.{key}" if name else key)]
    return [] if saved == current else [f"{name}: {saved!r} -> {current!r}"]


def run_meta(model_config: ModelConfig, qs: QuietStarConfig | None, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"model_config": model_config.to_dict(), "quiet_star": None if qs is None else qs.__dict__.copy(),
            "settings": result_settings(cfg)}


# ----------------------------------------------------------------------------------- data

# A random init trains its tokenizer on at most this many leading training documents.
TOKENIZER_DOCUMENTS = 50_000


class Batches:
    """Global (tokens, segments) batches as sharded arrays, A x B x N; each process builds
    (reads and tokenises) only the rows of its own devices, each once per step."""

    def __init__(self, rows: data.Rows, accum: int, batch: int, mesh):
        if batch <= 0 or accum <= 0 or batch % accum:
            raise UserError(f"batch_size {batch} must be a positive multiple of grad_accum {accum}")
        self.rows, self.accum, self.micro = rows, accum, batch // accum
        self.sharding = sharding.batch_sharding(mesh)
        self.shape = (accum, self.micro, rows.seq_len)
        width = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.micro % width:
            raise UserError(f"micro-batch of {self.micro} sequences does not split over data x fsdp = {width}")

    def __call__(self, step: int) -> tuple[jax.Array, jax.Array]:
        built: dict[int, data.Row] = {}  # devices that share rows (tensor axis) share the work

        def row(index: int) -> data.Row:
            if index not in built:
                built[index] = self.rows[index]
            return built[index]

        def field(name):
            def callback(index):
                acc, rows, _ = (range(*s.indices(n)) for s, n in zip(index, self.shape))
                first = step * self.accum * self.micro
                return np.stack([np.stack([getattr(row(first + a * self.micro + r), name) for r in rows])
                                 for a in acc])
            return callback

        return (jax.make_array_from_callback(self.shape, self.sharding, field("tokens_N")),
                jax.make_array_from_callback(self.shape, self.sharding, field("segments_N")))


# --------------------------------------------------------------------------------- train


def abstract_and_shardings(params_fn, optimizer, mesh):
    abstract_state = jax.eval_shape(lambda: init_train_state(params_fn(), optimizer, jax.random.key(0)))
    return abstract_state, sharding.state_shardings(abstract_state, optimizer, mesh)


def compile_step(loss_fn, optimizer, state_shardings, batch_sharding, n_inputs: int = 2):
    """The jitted train step over `n_inputs` per-token arrays (tokens, segments, ...)."""
    step = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer)
    return jax.jit(
        step,
        in_shardings=(state_shardings,) + (batch_sharding,) * n_inputs,
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def preflight(model_config, qs, optimizer, mesh, cfg) -> dict[str, float]:
    """Per-device memory (GB) of loading and of the train step, from AOT compiles on abstract
    inputs: the loaded params' shards, the state initialisation they feed (params -> params
    + Adam moments), and one train step."""
    abstract_state, shardings = abstract_and_shardings(params_shape_fn(model_config, qs), optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    shape = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum, cfg.data.seq_len)
    abstract_in = lambda dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    init = jax.jit(lambda p: init_train_state(p, optimizer, jax.random.key(0)), out_shardings=shardings)
    init_mem = init.lower(state_in.params).compile().memory_analysis()
    compiled = compile_step(loss_fn_for(model_config, qs), optimizer, shardings, batch_sharding).lower(
        state_in, abstract_in(jnp.int32, batch_sharding), abstract_in(jnp.int32, batch_sharding)
    ).compile()
    mem = compiled.memory_analysis()
    gb = lambda x: float(f"{x / 2**30:.4g}")
    peak = lambda m: m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    shard_bytes = sum(np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(state_in.params))
    return {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "params_billion": round(sum(np.prod(a.shape) for a in jax.tree.leaves(abstract_state.params)) / 1e9, 3),
        "loaded_params_gb_per_device": gb(shard_bytes),
        "init_state_peak_gb_per_device": gb(peak(init_mem)),
        "argument_gb_per_device": gb(mem.argument_size_in_bytes),
        "temp_gb_per_device": gb(mem.temp_size_in_bytes),
        "output_gb_per_device": gb(mem.output_size_in_bytes),
        "alias_gb_per_device": gb(mem.alias_size_in_bytes),
        "peak_gb_per_device": gb(peak(mem)),
    }


def evaluate(eval_fn, state, batches: list) -> dict[str, float]:
    totals: dict[str, float] = {}
    for inputs in batches:
        metrics = jax.device_get(eval_fn(state.params, *(x[0] for x in inputs)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
    return totals


def parse_eval_tasks(spec: str) -> list[tuple[str, list]]:
    """"gsm8k:dev.jsonl:50,csqa:dev.jsonl" -> [(task, examples)], loaded (and checked) up front."""
    task_sets = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        fields = item.split(":")
        if len(fields) not in (2, 3):
            raise UserError(f"eval_tasks entry {item!r} is not TASK:FILE[:LIMIT]")
        limit = int(fields[2]) if len(fields) == 3 else 0
        task_sets.append((fields[0], load_examples(fields[0], fields[1], limit)))
    return task_sets


def evaluate_tasks(evaluator: Evaluator, task_sets: list[tuple[str, list]]) -> dict[str, float]:
    """The zero-shot benchmarks with thinking (periodic evaluation during training)."""
    metrics = {}
    for task, examples in task_sets:
        result = evaluate_examples(evaluator, task, examples)
        metrics[f"eval/{task}/soft_score"] = result["soft_score"]
        metrics[f"eval/{task}/accuracy"] = result["accuracy"]
    for name in ("soft_score", "accuracy"):  # the papers' benchmark average
        metrics[f"eval/average/{name}"] = float(np.mean([metrics[f"eval/{task}/{name}"] for task, _ in task_sets]))
    return metrics


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary.

    With several processes every host must save at the same step (the save is a
    collective), so there JAX's preemption service, which catches SIGTERM itself and
    agrees on a sync step through the coordinator, decides alone; installing our own
    handler would replace its signal handler and let hosts stop at different steps.
    """

    def __init__(self):
        self.requested = False
        self.checks = 0  # the sync-point counter: one check per step in every process, and
        # monotonic across the stages of a curriculum chain (whose step numbers restart)
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __call__(self) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            self.checks += 1
            self.requested = multihost_utils.reached_preemption_sync_point(self.checks)
        return self.requested


# Run settings that must be positive (>= 1), checked before anything is loaded or compiled:
# found any later, a 0 would cost a compile (checkpoint_every=0 divides by zero after the
# first step), or worse, finish "successfully" (steps=0, keep_checkpoints=0 keeps none).
POSITIVE_SETTINGS = ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
                     "eval_batches")


def check_run_settings(cfg: ml_collections.ConfigDict) -> None:
    for name in POSITIVE_SETTINGS:
        if cfg[name] < 1:
            raise UserError(f"{name} must be >= 1, got {cfg[name]}")
    if cfg.eval_every < 0:
        raise UserError(f"eval_every must be >= 0 (0 = never), got {cfg.eval_every}")
    if cfg.data.seq_len < 2:
        raise UserError(f"data.seq_len must be >= 2 (a token and its successor), got {cfg.data.seq_len}")
    # The option dataclasses check their own values; building them here makes those
    # checks run before the workdir is locked or anything is written there.
    dataclass_from(OptimizerConfig, cfg.optimizer)
    ntp_config(cfg)


def train(cfg: ml_collections.ConfigDict, workdir: str, preflight_only: bool = False) -> None:
    """One training run, or with `curriculum.stages` the whole chain of them."""
    check_run_settings(cfg)
    if workdir and paths.path(workdir).exists() and not paths.path(workdir).is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a directory")
    init_distributed(cfg.distributed)
    if cfg.compilation_cache_dir:
        # JAX keys entries by program, compiler options and versions, so a stale hit cannot happen.
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
    if preflight_only:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        optimizer = make_optimizer(dataclass_from(OptimizerConfig, cfg.optimizer))
        model_config = dataclass_from(ModelConfig, cfg.model, vocab_size=cfg.preflight_vocab_size)
        qs = dataclass_from(QuietStarConfig, cfg.quiet_star, start_token_id=model_config.vocab_size - 2,
                            end_token_id=model_config.vocab_size - 1)
        print(json.dumps(preflight(model_config, qs, optimizer, mesh, cfg)))
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


def train_run(cfg: ml_collections.ConfigDict, workdir: str, selection: curriculum.Selection | None = None,
              preempted: Preemption | None = None) -> bool:
    """Trains `cfg.steps` steps in `workdir` (resuming there); False if preempted first.

    With `selection`, every checkpoint carries that evaluation metric and the best one is
    kept whatever `keep_checkpoints` says (a curriculum stage picks it for the next stage).
    """
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if mesh.size > 1 and cfg.method == "quiet_star" and cfg.quiet_star.rollout_impl == "two_pass":
        # Sharded over 8 forced CPU devices its step deadlocked in XLA:CPU's collectives
        # (docs/method.md); until that is understood it runs where it was proven.
        raise UserError(f"quiet_star.rollout_impl='two_pass' runs on one device only, this mesh has {mesh.size}; "
                        "use rollout_impl='scan'")
    optimizer_config = dataclass_from(OptimizerConfig, cfg.optimizer)
    optimizer = make_optimizer(optimizer_config)
    learning_rate = learning_rate_schedule(optimizer_config)
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    ckpt = RunCheckpoints(str(paths.path(workdir) / checkpoint.CHECKPOINTS_DIR), cfg.keep_checkpoints,
                          best_mode=None if selection is None else selection.mode)
    start_step = verified_start(ckpt)
    clock = time.perf_counter()
    documents = data.load_documents(cfg.data)
    train_docs, eval_docs = data.split_documents(documents, cfg.data.eval_documents)
    if start_step is None:
        model_config, params, tokenizer = load_base_model(
            cfg, data.leading_documents(train_docs, TOKENIZER_DOCUMENTS), workdir, mesh)
        model_config, qs, params, tokenizer = prepare_method(cfg, model_config, params, tokenizer)
        meta = run_meta(model_config, qs, cfg)
        abstract_state, state_shardings = abstract_and_shardings(lambda p=params: p, optimizer, mesh)
        state = jax.jit(lambda p: init_train_state(p, optimizer, jax.random.key(cfg.seed)),
                        out_shardings=state_shardings)(params)
        del params
        model_files.save_model_files(workdir, model_config, tokenizer)  # for resume, evaluate, generate
        start_step = 0
        status(f"loaded model from {cfg.init_from or 'a random init'} in {time.perf_counter() - clock:.1f} s")
    else:
        check_method(cfg.method)
        model_config, tokenizer = resumed_model(cfg, workdir)
        qs = quiet_star_config(cfg, tokenizer)
        meta = run_meta(model_config, qs, cfg)
        abstract_state, state_shardings = abstract_and_shardings(params_shape_fn(model_config, qs), optimizer, mesh)
        state, start_step = restore_newest_readable(ckpt, start_step, abstract_state, state_shardings, meta,
                                                    len(train_docs), cfg.allow_config_change)
        status(f"resumed from step {start_step} in {workdir} ({time.perf_counter() - clock:.1f} s)")
    clock = time.perf_counter()
    batches = Batches(data.Rows(train_docs, tokenizer, cfg.data.seq_len, cfg.seed, cfg.data.packing),
                      cfg.grad_accum, cfg.batch_size, mesh)
    status(f"data: {len(train_docs)} training documents ({'packed' if cfg.data.packing else 'one per row'}), "
           f"{len(eval_docs)} held out (opened in {time.perf_counter() - clock:.1f} s)")
    teacher = load_teacher(cfg, mesh, batches.sharding, model_config.vocab_size) if cfg.method == "ntp" else None

    def inputs_at(source: Batches, step: int, rng_seed: int) -> tuple:
        """(tokens, segments) of a step, plus the teacher's signal on them for the NTP student."""
        tokens, segments = source(step)
        if teacher is None:
            return tokens, segments
        return tokens, segments, teacher(tokens, segments, jax.random.fold_in(jax.random.key(rng_seed), step))

    eval_batches = []
    if len(eval_docs) and cfg.eval_every > 0:
        eval_rows = data.Rows(eval_docs, tokenizer, cfg.data.seq_len, cfg.seed + 1, cfg.data.packing)
        eval_source = Batches(eval_rows, 1, batches.micro, mesh)
        eval_batches = [inputs_at(eval_source, i, cfg.seed + 4) for i in range(cfg.eval_batches)]

    task_sets = parse_eval_tasks(cfg.eval_tasks)
    loss_fn = loss_fn_for(model_config, qs, ntp_config(cfg) if cfg.method == "ntp" else None)
    clock = time.perf_counter()
    inputs = [jax.ShapeDtypeStruct(batches.shape, jnp.int32, sharding=batches.sharding)] * 2
    if teacher is not None:  # NLL_T per token, or ("kl") a distribution over the vocabulary per token
        per_token = (model_config.vocab_size,) if cfg.ntp.form == "kl" else ()
        inputs.append(jax.ShapeDtypeStruct(batches.shape + per_token, jnp.float32, sharding=batches.sharding))
    step_fn = compile_step(loss_fn, optimizer, state_shardings, batches.sharding, len(inputs)).lower(
        state, *inputs).compile()
    status(f"compiled the train step in {time.perf_counter() - clock:.1f} s")
    eval_fn = jax.jit(lambda p, t, v, *x: loss_fn(p, t, v, jax.random.key(cfg.seed + 2), *x)[1])
    log = MetricsLog(workdir, cfg.steps, start_step, cfg.wandb_project, cfg.to_dict())
    preempted = preempted or Preemption()
    tokens_per_step = cfg.batch_size * cfg.data.seq_len
    # The NTP student's cost only (its teacher's forward pass is not counted).
    step_flops, token_passes_per_step = flops.train_step_cost(model_config, qs, cfg.batch_size, cfg.data.seq_len)
    peak, peak_source = flops.peak_flops()
    status(f"{step_flops:.3g} model FLOPs per step; peak {peak:.3g} FLOP/s ({peak_source})")
    step = start_step
    last_log = (step, time.perf_counter())
    while step < cfg.steps:
        state, metrics = step_fn(state, *inputs_at(batches, step, cfg.seed + 3))
        step += 1
        last = step == cfg.steps
        want_save = step % cfg.checkpoint_every == 0 or last or preempted()
        if step % cfg.log_every == 0 or want_save:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics["loss"]):
                ckpt.wait()
                raise UserError(f"non-finite loss ({metrics['loss']}) at step {step}; stopped without saving, "
                                f"last good checkpoint: step {ckpt.latest_verified_step()}")
            # Steps are dispatched asynchronously; the fetch above waited for all of them.
            now = time.perf_counter()
            steps_per_s = (step - last_log[0]) / (now - last_log[1])
            metrics["tokens_per_s"] = tokens_per_step * steps_per_s
            metrics["token_passes_per_s"] = token_passes_per_step * steps_per_s  # thought tokens too
            if peak > 0:
                metrics["mfu"] = step_flops * steps_per_s / peak
            last_log = (step, now)
            metrics["learning_rate"] = float(learning_rate(step))
            log.write(step, metrics)
        metric = None
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or last):
            eval_metrics = {}
            if eval_batches:
                eval_metrics.update({f"eval/{k}": v for k, v in evaluate(eval_fn, state, eval_batches).items()})
            if task_sets:
                evaluator = Evaluator(model_config, qs, state.params, tokenizer, qs is not None)
                eval_metrics.update(evaluate_tasks(evaluator, task_sets))
            if selection is not None:
                metric = curriculum.selection_metric(eval_metrics, selection.metric)
                eval_metrics[curriculum.SELECTION_KEY] = metric
            if eval_metrics:
                log.write(step, eval_metrics)
        if want_save:
            ckpt.save(step, state, meta, metric, len(train_docs))
            if preempted.requested:
                ckpt.wait()
                log.close()
                print(f"preempted: saved checkpoint at step {step}, exiting", flush=True)
                return False
    ckpt.wait()
    log.close()
    return True


def verified_start(ckpt: checkpoint.TrainCheckpoints) -> int | None:
    """The newest checkpoint step whose files match its manifest; each newer, corrupt one
    is moved aside (never deleted) with one line saying why. None: start from scratch."""
    step = ckpt.latest_step()
    while step is not None and (problem := ckpt.verify(step)) is not None:
        step = _set_aside(ckpt, step, f"is corrupt: {problem}")
    return step


def _set_aside(ckpt: checkpoint.TrainCheckpoints, step: int, why: str) -> int:
    """Moves a bad step aside; the step to resume from instead (refusing to start over)."""
    where = ckpt.set_aside(step)
    previous = verified_start(ckpt)
    if previous is None:
        raise UserError(f"checkpoint at step {step} {why}; moved to {where}, and no earlier checkpoint is left: "
                        "start again with a new --workdir")
    status(f"warning: checkpoint at step {step} {why}; moved to {where}, resuming from step {previous}")
    return previous


def restore_newest_readable(ckpt: RunCheckpoints, step: int, abstract_state, shardings, meta, train_documents: int,
                            allow_changes: bool) -> tuple[TrainState, int]:
    """Restores `step`, or the newest earlier step that reads, when Orbax cannot read it (a
    step without a manifest cannot be checked beforehand). Settings mismatches are not
    corruption: they stop the run."""
    while True:
        try:
            return ckpt.restore(step, abstract_state, shardings, meta, train_documents, allow_changes), step
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore raise many types for unreadable files
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            step = _set_aside(ckpt, step, f"is unreadable ({type(e).__name__}: {reason})")


class RunCheckpoints(checkpoint.TrainCheckpoints):
    """Training checkpoints that carry and check the run's model / method configs."""

    def save(self, step: int, state: TrainState, meta: dict[str, Any],  # type: ignore[override]
             metric: float | None = None, train_documents: int = 0) -> None:
        # The data position: rows are a pure function of (seed, step, row) over this many
        # training documents, so the next step is all a resume needs.
        super().save(step, state.to_dict(), {"next_step": step, "train_documents": train_documents}, meta, metric)

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState,  # type: ignore[override]
                meta: dict[str, Any], train_documents: int = 0, allow_changes: bool = False) -> TrainState:
        saved = self.restore_meta(step)
        if saved["model_config"] != meta["model_config"]:
            differing = sorted(k for k in meta["model_config"]
                               if saved["model_config"].get(k) != meta["model_config"][k])
            raise UserError(f"checkpoint at step {step} in {self.directory} is for another model "
                            f"(differs in: {', '.join(differing)}); use a new --workdir")
        changes = changed_settings(saved.get("settings", meta["settings"]), meta["settings"])
        if changes and not allow_changes:
            raise UserError(f"checkpoint at step {step} in {self.directory} was trained with other settings "
                            f"({'; '.join(changes)}); rerun with them, use a new --workdir, or pass "
                            "--config.allow_config_change=True")
        if changes:
            status(f"warning: resuming step {step} with changed settings: {'; '.join(changes)}")
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        state, data_state = super().restore(step, target.to_dict())
        if data_state["next_step"] != step:
            raise UserError(f"checkpoint at step {step} has inconsistent data state {data_state}")
        saved_documents = data_state.get("train_documents", train_documents)
        if saved_documents != train_documents:
            status(f"warning: the checkpoint was trained on {saved_documents} documents, the data now has "
                   f"{train_documents}: rows from step {step} on differ from an uninterrupted run")
        return TrainState.from_dict(state)


def status(message: str) -> None:
    """What the run is doing before its first step (loading, tokenising, compiling)."""
    if paths.is_writer():
        print(message, flush=True)


@exit_on_user_error
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    cfg = _CONFIG.value
    if cfg is None:
        raise UserError("--config experiments/NAME.py is required")
    if not _WORKDIR.value and not _PREFLIGHT.value:
        raise UserError("--workdir DIR is required")
    train(cfg, _WORKDIR.value, _PREFLIGHT.value)


def _config_file(argv: list[str]) -> str | None:
    """The --config argument's file (ml_collections also accepts FILE:ARGS)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-file and config-override mistakes reported in one line."""
    config_file = _config_file(argv)
    if config_file is not None and not os.path.isfile(config_file):
        print(f"error: config file not found: {config_file}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no config key
        # The message is the key, quoted, and may go on with a "Did you mean ..." line.
        key, *hint = str(e.args[0] if e.args else e).splitlines()
        key = key.strip("'\"")
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        named = [a for a in overrides if key in a.split(".")] or overrides
        hint_text = f"; {' '.join(hint)}" if hint else ""
        print(f"error: unknown config key '{key}'{hint_text} (in {', '.join(named)})", file=sys.stderr)
    except (TypeError, ValueError) as e:  # ml_collections: an override of the wrong type
        print(f"error: bad config override: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
