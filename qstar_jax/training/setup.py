"""What a run trains: the base model (HF, a model directory, a training run or a random init
with a new tokenizer), adapted to the method (thought tokens and parameters added, kept,
reset or stripped), the NTP stage's teacher, and the settings a checkpoint records."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.method import ntp
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.gate import with_think_gate
from qstar_jax.method.mixing import init_quiet_star_params
from qstar_jax.models import hf, model_files, sharding
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import Params, init_params
from qstar_jax.models.vocab import grow_vocab, truncate_vocab
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
from qstar_jax.training import checkpoint
from qstar_jax.training.step import OptimizerConfig

THOUGHT_INIT_TEXT = "---"  # the official init of the start/end thought embeddings


# Model settings a run decides even when the weights come from init_from (the rest is the
# checkpoint's architecture), and the ones a random init takes from its tokenizer.
RUN_MODEL_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll")


TOKENIZER_MODEL_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id")


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


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    """config.optimizer, whose total_steps 0 (the default) follows the run's steps."""
    values = cfg.optimizer.to_dict()
    return OptimizerConfig(**{**values, "total_steps": values["total_steps"] or cfg.steps})


def ntp_config(cfg: ml_collections.ConfigDict) -> ntp.NTPConfig:
    """The NTP loss knobs (config.ntp also names the teacher run)."""
    return ntp.NTPConfig(**{f.name: cfg.ntp[f.name] for f in dataclasses.fields(ntp.NTPConfig)})


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


def add_thoughts(model_config: ModelConfig, params: Params, tokenizer: Tokenizer,
                 cfg: ml_collections.ConfigDict) -> tuple:
    """Adds the thought tokens, grows the vocab, and builds the Quiet-STaR params."""
    init_id = tokenizer.encode(THOUGHT_INIT_TEXT)[0]
    init_D = jnp.asarray(params["embed_tokens"]["embedding"][init_id], jnp.float32)
    start_id, end_id = add_thought_tokens(tokenizer)
    vocab = max(model_config.vocab_size, end_id + 1)
    in_vocab = [i for i in (start_id, end_id) if i < model_config.vocab_size]  # a padded vocab's unused rows
    model_config, params = grow_vocab(model_config, params, vocab, jax.random.key(cfg.seed + 2), in_vocab)
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


def prepare_method(cfg: ml_collections.ConfigDict, model_config: ModelConfig, params: Params,
                   tokenizer: Tokenizer) -> tuple:
    """(model config, QuietStarConfig or None, params, tokenizer) for `cfg.method`.

    quiet_star: thought tokens and params are added, or kept when init_from already has
    them (a curriculum stage continues its predecessor's thoughts and mixing head, whose
    shapes do not depend on n_ahead), unless `curriculum.reinit_thoughts` starts them over;
    the think gate follows `quiet_star.think_gate`. lm / ntp: a plain LM, thought parts removed.
    """
    check_method(cfg.method)
    has_thoughts = "thought" in params
    if cfg.method == "quiet_star":
        if not has_thoughts:
            return (*add_thoughts(model_config, params, tokenizer, cfg), tokenizer)
        qs = quiet_star_config(cfg, tokenizer)
        if cfg.curriculum.reinit_thoughts:
            params = reinit_thoughts(params, tokenizer, qs)
        # A think gate is added when asked for and missing, and dropped when not asked for.
        if "think_gate" in params and not qs.think_gate:
            params = {k: v for k, v in params.items() if k != "think_gate"}
        return model_config, qs, with_think_gate(model_config, qs, params, jax.random.key(cfg.seed + 5)), tokenizer
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
RESULT_SETTINGS = ("method", "seed", "batch_size", "grad_accum", "quiet_star", "ntp", "data", "optimizer", "tokenizer",
                   "tokenizer_type", "tokenizer_vocab_size")


def result_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    settings = {k: cfg[k].to_dict() if isinstance(cfg[k], ml_collections.ConfigDict) else cfg[k]
                for k in RESULT_SETTINGS}
    settings["optimizer"] = dataclasses.asdict(optimizer_config(cfg))  # total_steps resolved
    return json.loads(json.dumps(settings))  # as a checkpoint stores them (tuples become lists)


def run_meta(model_config: ModelConfig, qs: QuietStarConfig | None, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint records of its run. `follows_steps`: the settings derived from
    `steps` (which may change on a resume: a run is extended or stopped early)."""
    return {"model_config": model_config.to_dict(), "quiet_star": None if qs is None else qs.__dict__.copy(),
            "settings": result_settings(cfg),
            "follows_steps": [] if cfg.optimizer.total_steps else ["optimizer.total_steps"]}
