"""Hooks the training loop runs after steps: logging with throughput and MFU, held-out and
benchmark evaluation, checkpointing with preemption, and profiling.

A hook is a callable of a `StepEnd`; `trainer.Trainer.add_hook` says when it runs (every N
steps, when a checkpoint is due, at the last step). Hooks run in the order they were added,
so evaluation can hand the checkpoint its selection metric and a hook can stop the run.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from qstar_jax.errors import UserError
from qstar_jax.training.checkpoint import SELECTION_METRIC, RunCheckpoints
from qstar_jax.training.metrics import MetricsLog
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
    selection: float | None = None  # the evaluation metric the checkpoint carries (set by `Evaluate`)
    stop: bool = False  # set by a hook: end the run after this step


class LogMetrics:
    """Fetches the step's metrics (waiting for the steps dispatched before it), stops a run
    whose loss is not finite before anything is saved, and writes them with throughput,
    MFU against `peak_flops` and the learning rate."""

    def __init__(self, log: MetricsLog, ckpt: RunCheckpoints, learning_rate: Callable[[int], Any], start_step: int,
                 tokens_per_step: int, token_passes_per_step: int, step_flops: float, peak_flops: float):
        self.log, self.ckpt, self.learning_rate = log, ckpt, learning_rate
        self.per_step = {"tokens_per_s": tokens_per_step, "token_passes_per_s": token_passes_per_step}
        if peak_flops > 0:
            self.per_step["mfu"] = step_flops / peak_flops
        self.last = (start_step, time.perf_counter())

    def __call__(self, end: StepEnd) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(end.metrics).items()}
        if not np.isfinite(metrics["loss"]):
            self.ckpt.wait()
            raise UserError(f"non-finite loss ({metrics['loss']}) at step {end.step}; stopped without saving, "
                            f"last good checkpoint: step {self.ckpt.latest_verified_step()}")
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
    """Saves the state with the data position and run metadata; after a preemption request,
    waits for the save and stops the run."""

    def __init__(self, ckpt: RunCheckpoints, meta: dict[str, Any], train_documents: int, preempted: "Preemption"):
        self.ckpt, self.meta, self.train_documents, self.preempted = ckpt, meta, train_documents, preempted

    def __call__(self, end: StepEnd) -> None:
        self.ckpt.save(end.step, end.state, self.meta, end.selection, self.train_documents)
        if self.preempted.requested:
            self.ckpt.wait()
            print(f"preempted: saved checkpoint at step {end.step}, exiting", flush=True)
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


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary.

    With several processes every host must save at the same step (the save is a
    collective), so there JAX's preemption service, which catches SIGTERM itself and
    agrees on a sync step through the coordinator, decides alone; installing our own
    handler would replace its signal handler and let hosts stop at different steps.
    """

    def __init__(self):
        self.requested = False
        # The sync-point counter: one check per step that saves no checkpoint anyway (the
        # same steps in every process), monotonic across the stages of a curriculum chain
        # (whose step numbers restart).
        self.checks = 0
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
