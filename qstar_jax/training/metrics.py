"""Training metrics: metrics.jsonl, TensorBoard events, a console progress line, optional wandb.

Only process 0 writes, through the path layer (a gs:// workdir gets its logs in the bucket:
`metrics.jsonl` and TensorBoard's event file (tensorboard.py) are appended to
locally and re-uploaded whole on a bucket, which cannot append). On a terminal the console
shows one updating progress line (step, loss, reward, mixing weight, tokens/s, ETA); in a
log file (CI, pods) it prints plain lines.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any, Iterator

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.training.checkpoint import CHECKPOINTS_DIR
from qstar_jax.training.manifest import MANIFEST_FILE
from qstar_jax.training.storage import append, storage_failure
from qstar_jax.training.tensorboard import EventFile

METRICS_FILE = "metrics.jsonl"  # in the workdir: one JSON line per logged step
CONSOLE_KEYS = ("loss", "nll_base", "nll_talk", "reward", "reward_baselined", "mixing_weight", "tokens_per_s", "mfu")


class LogWriteFailed(UserError):
    """Storage refused a write to the run's logs (a full disk, a quota, a file-size limit);
    the lines and events written before are kept."""


class MetricsLog:
    """One run's metrics log in its workdir: `write(step, metrics)` appends to metrics.jsonl
    and TensorBoard (and wandb if configured) and updates the console; a resumed run drops
    what earlier starts logged after the checkpoint it resumes from. A write that storage
    refuses ends the run in one line (`LogWriteFailed`) naming the file and the newest
    checkpoint; local files are written unbuffered, so nothing is left to fail again at exit."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, wandb_project: str = "",
                 config: dict[str, Any] | None = None):
        self.enabled = paths.is_writer()
        self.total_steps, self.start_step = total_steps, start_step
        self.start_time = time.perf_counter()
        self.tty = sys.stdout.isatty()
        self.wandb = None
        if not self.enabled:
            return
        self.workdir = workdir
        self.jsonl_path = paths.path(workdir) / METRICS_FILE
        # Locally lines are appended; a bucket object cannot be appended to, so there the
        # lines are kept and the object re-uploaded whole at each write.
        self.remote = paths.is_remote(workdir)
        with self._storage_failures_named(self.jsonl_path):
            kept = self._earlier_lines(start_step)
            if self.jsonl_path.exists():
                paths.write_text(self.jsonl_path, "".join(kept))
            if self.remote:
                self.jsonl_lines = kept
            else:
                self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
                self.jsonl = open(self.jsonl_path, "ab", buffering=0)
        with self._storage_failures_named(paths.path(workdir) / "tensorboard"):
            self.tensorboard = EventFile(paths.path(workdir) / "tensorboard")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed; logging locally only", file=sys.stderr)
            else:
                self.wandb = wandb.init(project=wandb_project, config=config, dir=workdir)

    def _earlier_lines(self, start_step: int) -> list[str]:
        """The lines of earlier starts up to `start_step`, the checkpoint this start resumes
        from: the steps after it are trained again and logged again, so their first log
        (and a line cut short by a kill) is dropped rather than left to appear twice."""
        return [line if line.endswith("\n") else line + "\n"
                for step, line in logged_lines(self.jsonl_path) if step <= start_step]

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        with self._storage_failures_named(self.jsonl_path):
            if self.remote:
                self.jsonl_lines.append(line)
                paths.write_text(self.jsonl_path, "".join(self.jsonl_lines))
            else:
                append(self.jsonl, line.encode())
        with self._storage_failures_named(self.tensorboard.path):
            self.tensorboard.scalars(step, metrics)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self._console(step, metrics)

    @contextlib.contextmanager
    def _storage_failures_named(self, path: paths.PathLike) -> Iterator[None]:
        """A full disk (or quota, read-only mount, file-size limit) under a log file: one line
        naming it and the step a rerun resumes from (which logs the steps after it again)."""
        try:
            yield
        except OSError as e:
            if (failure := storage_failure(e)) is None:
                raise
            raise LogWriteFailed(f"cannot write {path}: {failure}; {newest_checkpoint(self.workdir)}; what was logged "
                                 "before is kept; fix the storage and rerun the same command to resume") from None

    def _console(self, step: int, metrics: dict[str, float]) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        shown = [f"{k}={metrics[k]:.4g}" for k in CONSOLE_KEYS if k in metrics]
        shown += [f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval/")]
        line = f"step {step}/{self.total_steps} " + " ".join(shown) + f" eta={eta:.0f}s"
        if self.tty:
            end = "\n" if step == self.total_steps or any(k.startswith("eval/") for k in metrics) else ""
            print("\r\033[K" + line, end=end, flush=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            print()
        if not self.remote:
            self.jsonl.close()
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def logged_lines(metrics_file: paths.PathLike) -> list[tuple[int, str]]:
    """(step, line) of each whole line of a metrics log, in order (a line cut short by a kill,
    or anything else that is no logged step, is skipped); none if there is no log."""
    metrics_file = paths.path(metrics_file)
    if not metrics_file.exists():
        return []
    logged = []
    for line in metrics_file.read_text().splitlines(keepends=True):
        try:
            logged.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError):
            continue
    return logged


def newest_checkpoint(workdir: str) -> str:
    """The step a rerun of `workdir` resumes from: the newest with its manifest (a step saved
    without one, its run stopped first, is set aside at the resume)."""
    directory = paths.path(workdir) / CHECKPOINTS_DIR
    steps = [int(d.name) for d in directory.iterdir()
             if d.name.isdigit() and (d / MANIFEST_FILE).exists()] if directory.is_dir() else []
    return f"newest checkpoint: step {max(steps)}" if steps else "no checkpoint yet"


def status(message: str) -> None:
    """What the run is doing before its first step (loading, tokenising, compiling)."""
    if paths.is_writer():
        print(message, flush=True)
