"""What a training run's --workdir holds, and the checks that keep a run from writing over
anything else: a run trains only in an empty directory or one that holds a run (never a
model directory or unrelated files), and it never starts over silently where a run
trained before but left no usable checkpoint."""

from __future__ import annotations

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.models.model_files import MODEL_CONFIG_FILE, TOKENIZER_DIR, is_model_dir
from qstar_jax.training.checkpoint import CHECKPOINTS_DIR, CORRUPT_DIR
from qstar_jax.training.curriculum import CHAIN_FILE, MODEL_DIR, SUMMARY_FILE
from qstar_jax.training.metrics import METRICS_FILE, logged_lines
from qstar_jax.training.resume import FRESH_START_SETTING
from qstar_jax.training.run_lock import LOCK_FILE

# Every name a run or a curriculum chain writes at the top of its workdir (tokenizer
# training writes bpe/ or words/, wandb its own folder, profiling profile/).
RUN_ENTRIES = frozenset({CHECKPOINTS_DIR, CORRUPT_DIR, "stages", MODEL_CONFIG_FILE, TOKENIZER_DIR, "bpe", "words",
                         METRICS_FILE, "tensorboard", "profile", "wandb", LOCK_FILE, CHAIN_FILE, SUMMARY_FILE,
                         MODEL_DIR})


def is_run_entry(name: str) -> bool:
    """A name a run writes, or the log a launcher writes its output to (`> WORKDIR/train.log`)."""
    return name in RUN_ENTRIES or name.endswith(".log") or name == "nohup.out"


def check_workdir(workdir: str) -> None:
    """Refuses a --workdir that is a file, a model directory (convert's output: a run would
    write its own model_config.json and tokenizer over it) or a directory of files no run
    wrote, before anything is written there. A directory holding a run's files and a few
    others (notes, launch logs) is still a run's."""
    paths.orbax_path(workdir)  # a name its checkpoints could not be stored under, refused first
    root = paths.path(workdir)
    if not root.exists():
        return
    if not root.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a directory")
    if is_model_dir(workdir):
        raise UserError(f"--workdir {workdir} is a model directory, not a training run: training there would "
                        "overwrite its files; use a new --workdir (and --config.init_from to start from this model)")
    names = sorted(p.name for p in root.iterdir())
    if names and not any(is_run_entry(name) for name in names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"--workdir {workdir} holds files no training run wrote ({shown}): training there could "
                        "overwrite them; use a new or empty --workdir")


def earlier_run(workdir: str) -> list[str]:
    """What shows that a run trained in `workdir` before: steps it set aside as unusable,
    steps it logged. Empty where nothing would be lost by starting at step 0 (a new
    workdir, or a run stopped before it logged a step)."""
    found = []
    corrupt = paths.path(workdir) / CORRUPT_DIR
    if corrupt.is_dir() and (names := sorted(p.name for p in corrupt.iterdir())):
        found.append(f"checkpoints set aside in {CORRUPT_DIR}/: {', '.join(names)}")
    if steps := [step for step, _ in logged_lines(paths.path(workdir) / METRICS_FILE)]:
        found.append(f"{METRICS_FILE} logs steps {min(steps)} to {max(steps)}")
    return found


def check_fresh_start(workdir: str, allowed: bool) -> None:
    """Before a run starts at step 0 where no checkpoint is usable: refused where a run
    trained before (unless `allowed`, the FRESH_START_SETTING); when allowed, that run's
    metrics.jsonl is kept under a new name (METRICS_FILE is rewritten from step 0)."""
    if not (found := earlier_run(workdir)):
        return
    if not allowed:
        raise UserError(f"--workdir {workdir} holds a run with no usable checkpoint ({'; '.join(found)}); rerun "
                        f"with --config.{FRESH_START_SETTING}=True to train from the start there (its "
                        f"{METRICS_FILE} is kept under a new name), or use a new --workdir")
    metrics_file = paths.path(workdir) / METRICS_FILE
    if metrics_file.exists() and paths.is_writer():
        kept = next(metrics_file.parent / f"{metrics_file.stem}.{n}.jsonl" for n in range(1, 10**6)
                    if not (metrics_file.parent / f"{metrics_file.stem}.{n}.jsonl").exists())
        metrics_file.rename(kept)
        print(f"starting over in {workdir} ({'; '.join(found)}); the earlier {METRICS_FILE} is kept as {kept.name}",
              flush=True)
