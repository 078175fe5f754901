"""Defaults every experiment starts from: the official Quiet-STaR run's settings.

Experiment files call `base.get_config()` and change what differs. Every key here is
overridable on the command line (`--config.optimizer.learning_rate=2e-6`); an unknown key
is an error.
"""

import dataclasses

import ml_collections

from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.ntp import NTPConfig
from qstar_jax.training.step import OptimizerConfig

# Thought token ids come from the tokenizer at run time, never from a config file.
_RUNTIME_QUIET_STAR_FIELDS = ("start_token_id", "end_token_id")


def _fields(cls, skip=()) -> dict:
    """The dataclass's defaulted fields (required ones are set explicitly below)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.name not in skip and f.default is not dataclasses.MISSING
    }


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # "quiet_star"; "lm": plain next-token training of the same LM (no thought tokens):
    # base-model pretraining, the paper's continued-training control; "ntp": Fast Quiet-STaR
    # NTP, a plain-LM student trained by RL against the thinking teacher `ntp.teacher`.
    config.method = "quiet_star"
    # Where the LM comes from: "" = random init from `model` below; else a qstar_jax model
    # directory (python -m qstar_jax.convert ...), a Hugging Face checkpoint directory, or
    # a training workdir (its checkpoint at `init_step`, 0 = newest; thought parts kept for
    # quiet_star, dropped for lm / ntp).
    config.init_from = ""
    config.init_step = 0
    # Tokenizer directory; "" = the init_from checkpoint's, or (random init) a BPE
    # tokenizer of `tokenizer_vocab_size` trained on the training documents.
    config.tokenizer = ""
    config.tokenizer_vocab_size = 512
    config.tokenizer_type = "bpe"  # for a trained tokenizer: "bpe" (byte-level) or "word" (one id per word)
    # Architecture for a random init (init_from=""); vocab and BOS/EOS come from the tokenizer.
    architecture = dict(model_type="llama", hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16)
    model = _fields(ModelConfig, skip=("bos_token_id", "eos_token_id", "sliding_window"))
    config.model = ml_collections.ConfigDict({**architecture, **model})
    config.model.sliding_window = ml_collections.FieldReference(None, field_type=int)
    config.quiet_star = ml_collections.ConfigDict(_fields(QuietStarConfig, skip=_RUNTIME_QUIET_STAR_FIELDS))
    config.optimizer = ml_collections.ConfigDict(_fields(OptimizerConfig))
    config.optimizer.total_steps = 0  # the schedule's length; 0 follows config.steps
    # method=ntp: the loss knobs (qstar_jax/method/ntp.py) and the teacher, a Quiet-STaR training
    # workdir and its checkpoint step (0 = newest). A curriculum sets the teacher itself.
    config.ntp = ml_collections.ConfigDict({**_fields(NTPConfig), "teacher": "", "teacher_step": 0})
    # Fast Quiet-STaR: a chain of stages, each a run from the previous stage's best
    # checkpoint by `metric` (an evaluation metric: eval/nll_next, eval/average/accuracy with
    # eval_tasks, ...). Each stage is a dict of qstar_jax.training.curriculum.Stage fields:
    # name, method, steps, learning_rate, every, [n_ahead, n_ahead_talk, student_init].
    # Empty: a single run. bench_tokens: tokens generated to time each stage's pick (0: skip).
    # reinit_thoughts: a Quiet-STaR run started from a thinking checkpoint (every curriculum
    # stage after the first) resets the start/end embeddings to "---" and the mixing head's
    # last layer to zero, as Fast Quiet-STaR's public code does; False carries them over.
    config.curriculum = ml_collections.ConfigDict(
        dict(stages=(), metric="eval/nll_next", mode="min", bench_tokens=256, reinit_thoughts=False)
    )
    config.data = ml_collections.ConfigDict(
        dict(
            source="default",  # "default" | "files" | "toy_reasoning" | "tfds"
            path="",  # files: directory or file; tfds: data_dir
            tfds_name="",
            split="train",
            text_field="text",
            max_documents=0,  # 0 = all
            default_documents=2000,
            default_seed=0,
            seq_len=256,
            # False (the official code): one document per row, randomly cropped or padded
            # with EOS. True: rows packed with consecutive documents, attention and targets
            # kept inside each (segment ids). See qstar_jax/training/data.py.
            packing=False,
            eval_documents=100,  # held out from the end of the document list
            # source="toy_reasoning": problems, their seed, the share written out with working;
            # of those, the share whose "---" opens an unrelated aside instead, and of the
            # rest the share whose working follows "---" rather than "::" (qstar_jax/toy/reasoning.py)
            toy=dict(problems=20000, seed=0, explicit_fraction=0.5, num_ops=5, aside_fraction=0.0,
                     delimiter_fraction=1.0),
        )
    )
    config.batch_size = 8  # sequences per optimizer step (global, all hosts)
    config.grad_accum = 1  # micro-batches per optimizer step
    config.steps = 100
    config.log_every = 10
    config.eval_every = 10
    config.eval_batches = 2
    # Zero-shot benchmarks run (with thinking) at every eval: "TASK:FILE[:LIMIT],..." e.g.
    # "gsm8k:data/gsm8k/test.jsonl:200,csqa:data/csqa/dev.jsonl:200" (qstar_jax/inference/tasks.py has the formats).
    config.eval_tasks = ""
    config.checkpoint_every = 50
    # A jax.profiler trace of `profile_steps` steps after step `profile_after` (or after the
    # first step run, compilation excluded), in WORKDIR/profile (TensorBoard's profile
    # plugin reads it; a local workdir only). 0 = no trace.
    config.profile_steps = 0
    config.profile_after = 1
    config.keep_checkpoints = 3
    # A resume whose method, data or optimizer settings differ from the checkpoint's is
    # refused (the differences are listed); True continues with the new settings.
    config.allow_config_change = False
    # A workdir where a run trained (it logged steps or set checkpoints aside) but left no
    # usable checkpoint is refused rather than started over; True starts at step 0 there
    # (the earlier metrics.jsonl is kept under a new name).
    config.allow_fresh_start = False
    # auto=True: compile the train step for each (data 1, fsdp, tensor) that divides the batch
    # and the heads and take the lowest per-device peak that fits the device's memory with
    # 10% free (qstar_jax/training/preflight.py); data/fsdp/tensor are then ignored.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, auto=False))
    config.distributed = ml_collections.ConfigDict(
        dict(mode="auto", coordinator_address="", num_processes=1, process_id=0)  # auto | on | off
    )
    # Compiled programs persist here (local or gs://) and a re-launch, a resume after
    # preemption or a run of the same shapes skips XLA compilation. "" = JAX's own setting
    # (the JAX_COMPILATION_CACHE_DIR environment variable; no cache when unset).
    config.compilation_cache_dir = ""
    config.preflight_vocab_size = 32002  # vocab for --preflight (no tokenizer is loaded then)
    config.wandb_project = ""  # log to Weights & Biases too, if installed
    return config
