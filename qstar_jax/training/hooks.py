"""Hooks the training loop runs after steps: logging with throughput and MFU, held-out and
benchmark evaluation, checkpointing with preemption, and profiling.

A hook is a callable of a `StepEnd`; `trainer.Trainer.add_hook` says when it runs (every N
steps, when a checkpoint is due, at the last step). Hooks run in the order they were added,
so evaluation can hand the checkpoint its selection metric and a hook can stop the run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import time
from typing import Any, Callable

import jax
import numpy as np

from qstar_jax.errors import UserError
from qstar_jax.training.checkpoint import SELECTION_METRIC
from qstar_jax.training.metrics import MetricsLog
from qstar_jax.training.resume import RunCheckpoints
from qstar_jax.training.step import NO_BAD_STATE
from qstar_jax.training.stop_signals import STOP_SIGNALS, take_held
from qstar_jax.inference.evaluate import Evaluator
from qstar_jax.inference.evaluate import evaluate as evaluate_examples
from qstar_jax.inference.tasks import load_examples


@dataclasses.dataclass
class StepEnd:
    """What the hooks see after a step."""

    step: int  # steps done
    state: Any  # the TrainState after it (donated to the next step: read it here, never keep it)
    metrics: dict[str, jax.Array]  # the step's metrics, still on the device
    last: bool  # the run's last step
    saving: bool  # a checkpoint is due (every checkpoint_every steps, the last step, preemption)
    first_bad: Any  # the first state no checkpoint may hold, by cause (step.first_bad_state), on the device
    selection: float | None = None  # the evaluation metric the checkpoint carries (set by `Evaluate`)
    stop: bool = False  # set by a hook: end the run after this step


class LogMetrics:
    """Fetches the step's metrics (waiting for the steps dispatched before it), stops a run
    whose state went bad (a non-finite loss, params or optimizer state) before anything of it
    is saved, and writes the metrics with throughput, MFU against `peak_flops` and the
    learning rate. Runs before every save, so a bad state is never checkpointed."""

    def __init__(self, log: MetricsLog, ckpt: RunCheckpoints, learning_rate: Callable[[int], Any], start_step: int,
                 tokens_per_step: int, token_passes_per_step: int, step_flops: float, peak_flops: float):
        self.log, self.ckpt, self.learning_rate = log, ckpt, learning_rate
        self.per_step = {"tokens_per_s": tokens_per_step, "token_passes_per_s": token_passes_per_step}
        if peak_flops > 0:
            self.per_step["mfu"] = step_flops / peak_flops
        self.last = (start_step, time.perf_counter())

    def __call__(self, end: StepEnd) -> None:
        values, first_bad = jax.device_get((end.metrics, end.first_bad))
        if min(first_bad) != NO_BAD_STATE:
            raise self.ckpt.stop_at_bad_state(int(first_bad[0]), int(first_bad[1]))
        metrics = {k: float(v) for k, v in values.items()}
        now = time.perf_counter()  # the fetch above waited for every step dispatched so far
        steps_per_s = (end.step - self.last[0]) / (now - self.last[1])
        self.last = (end.step, now)
        metrics.update({name: amount * steps_per_s for name, amount in self.per_step.items()})
        metrics["learning_rate"] = float(self.learning_rate(end.step))
        self.log.write(end.step, metrics)


class Evaluate:
    """Held-out loss and the zero-shot benchmarks (with thinking); with `selection_metric`,
    the value the checkpoint saved at this step is ranked by (a curriculum stage's pick)."""

    def __init__(self, log: MetricsLog, eval_fn, batches: list, task_sets: list, evaluator_of: Callable[[Any], Any],
                 selection_metric: Callable[[dict[str, float]], float] | None):
        self.log, self.eval_fn, self.batches, self.task_sets = log, eval_fn, batches, task_sets
        self.evaluator_of, self.selection_metric = evaluator_of, selection_metric

    def __call__(self, end: StepEnd) -> None:
        metrics = {}
        if self.batches:
            metrics.update({f"eval/{k}": v for k, v in evaluate(self.eval_fn, end.state, self.batches).items()})
        if self.task_sets:
            metrics.update(evaluate_tasks(self.evaluator_of(end.state.params), self.task_sets))
        if self.selection_metric is not None:
            end.selection = metrics[SELECTION_METRIC] = self.selection_metric(metrics)
        if metrics:
            self.log.write(end.step, metrics)


class SaveCheckpoint:
    """Saves the state with the data position and run metadata; after a stop request
    (`Preemption`: SIGTERM, SIGHUP, Ctrl-C), waits for the save and stops the run."""

    def __init__(self, ckpt: RunCheckpoints, meta: dict[str, Any], train_documents: int, preempted: "Preemption"):
        self.ckpt, self.meta, self.train_documents, self.preempted = ckpt, meta, train_documents, preempted

    def __call__(self, end: StepEnd) -> None:
        self.ckpt.wait()  # the previous save, with its manifest (`save` would wait for it anyway)
        self.preempted.newest_checkpoint = self.ckpt.latest_step()  # what a stop at once leaves
        self.ckpt.save(end.step, end.state, self.meta, end.selection, self.train_documents)
        if self.preempted.requested:
            self.ckpt.wait()
            self.preempted.newest_checkpoint = end.step
            print(f"{self.preempted.reason}: saved checkpoint at step {end.step}, exiting", flush=True)
            end.stop = True


class Profile:
    """A `jax.profiler` trace of steps first+1 .. first+count (after compilation and warm-up),
    written to `directory` (one trace per process, for TensorBoard's profile plugin)."""

    def __init__(self, directory: str, first: int, count: int):
        self.directory, self.first, self.count, self.tracing = directory, first, count, False

    def __call__(self, end: StepEnd) -> None:
        if end.step == self.first and not end.last:
            jax.profiler.start_trace(self.directory)
            self.tracing = True
        elif self.tracing and (end.step == self.first + self.count or end.last or end.stop):
            jax.block_until_ready(end.metrics)
            jax.profiler.stop_trace()
            self.tracing = False


def evaluate(eval_fn, state, batches: list) -> dict[str, float]:
    """Mean of each metric of `eval_fn` over the held-out batches."""
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


STOPPED_AT_ONCE_STATUS = 128 + signal.SIGINT  # what a shell reports for a command Ctrl-C stopped


class Preemption:
    """Stop signals: SIGTERM (a preemption notice), SIGHUP (the terminal closed) and SIGINT
    (Ctrl-C) stop the run without losing anything, and it exits 0 (a scheduler reruns it).

    Installed before the run loads anything. While it loads and compiles there is nothing
    new to save, so a request then ends the run once the step is compiled
    (`before_first_step`); later the loop saves a checkpoint at the next step boundary and
    stops (`SaveCheckpoint`). A SIGINT while a stop is already pending (Ctrl-C twice)
    stops at once, with exit status 130: the workdir is then as a kill -9 leaves it (the
    newest finished checkpoint resumes). Python runs handlers between bytecodes, so a
    signal during a long native call (XLA compiling) acts when that returns; one that came
    before this was installed (stop_signals.hold_early) acts now. A SIGHUP also points
    stdout and stderr at /dev/null where they were a terminal or a pipe: their reader is
    gone, and the next write to them (EIO, EPIPE) would end the run before it saves. A
    signal the process ignores (SIGHUP under nohup, SIGINT in a background job) stays ignored.

    With several processes every host must save at the same step (the save is a
    collective), so there JAX's preemption service, which catches SIGTERM itself and
    agrees on a sync step through the coordinator, decides alone; installing our own
    SIGTERM handler would replace its signal handler and let hosts stop at different steps.
    SIGHUP and a first SIGINT are passed to it as a SIGTERM to this process.
    """

    def __init__(self):
        self.requested = False  # the run stops at this step (several processes: the sync point says so)
        self.signal: int | None = None  # the first stop signal this process received
        self.stepping = False  # past `before_first_step`
        self.newest_checkpoint: int | None = None  # the newest finished step (SaveCheckpoint keeps it)
        # The sync-point counter: one check before the first step and one per step that
        # saves no checkpoint anyway (the same steps in every process), monotonic across the stages of a curriculum chain
        # (whose step numbers restart).
        self.checks = 0
        self.multi_process = jax.process_count() > 1
        self.console = [fd for fd in (1, 2) if _is_terminal_or_pipe(fd)]
        for signum in STOP_SIGNALS:
            left_to_jax = signum == signal.SIGTERM and self.multi_process
            if not left_to_jax and signal.getsignal(signum) != signal.SIG_IGN:
                signal.signal(signum, self._handle)
        for signum in take_held():
            self._handle(signum, None)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.signal is not None:
            self._stop_at_once()
        if signum == signal.SIGHUP:
            _silence(self.console)
        self.signal = self.signal or signum
        if self.multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, for a step every host saves
        else:
            self.requested = True
        if signum == signal.SIGINT and self.stepping:
            _say("interrupted: saving a checkpoint at the next step, then stopping (Ctrl-C again stops at once, "
                 "without saving)")
        elif signum == signal.SIGINT:
            _say("interrupted: stopping once the step is compiled, with nothing new to save (Ctrl-C again stops "
                 "at once)")

    def _stop_at_once(self) -> None:
        """Ends the process now, as a kill -9 would, with one line: nothing runs after it
        that could hang (a save in flight, a collective) or print a traceback."""
        if not self.stepping:
            _say("interrupted: stopped at once before the first step; nothing new to save")
        elif self.newest_checkpoint is None:
            _say("interrupted: stopped at once without saving; no checkpoint yet")
        else:
            _say(f"interrupted: stopped at once without saving; newest checkpoint: step {self.newest_checkpoint}")
        os._exit(STOPPED_AT_ONCE_STATUS)

    @property
    def reason(self) -> str:
        """Why the run stops, in its last line (another host's SIGTERM: preempted)."""
        return STOP_SIGNALS.get(self.signal, "preempted")

    def before_first_step(self, newest_checkpoint: int | None) -> bool:
        """Call once the step is compiled, with the step the run resumed from: True, having
        said so in one line, if a stop was requested while the run loaded and compiled
        (nothing new exists to save; the checkpoints are untouched)."""
        self.newest_checkpoint, self.stepping = newest_checkpoint, True
        if self():
            print(f"{self.reason} before the first step: nothing new to save", flush=True)
            return True
        return False

    def __call__(self) -> bool:
        if self.multi_process:
            from jax.experimental import multihost_utils

            self.checks += 1
            self.requested = multihost_utils.reached_preemption_sync_point(self.checks)
        return self.requested


def _is_terminal_or_pipe(fd: int) -> bool:
    try:
        return os.isatty(fd) or stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:  # closed
        return False


def _silence(fds: list[int]) -> None:
    """Points `fds` at /dev/null (async-signal-safe: no Python buffer is touched)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def _say(line: str) -> None:
    """A line on stderr from a signal handler: an os.write, since the main thread may be in
    the middle of a print (a buffered write there would raise on re-entry), on a new line
    after a terminal's progress line; nowhere if stderr is gone."""
    try:
        os.write(2, (("\n" if os.isatty(2) else "") + line + "\n").encode())
    except OSError:
        pass
