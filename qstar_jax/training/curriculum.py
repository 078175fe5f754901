"""Fast Quiet-STaR's chain of training stages, run and resumed as one command.

A config with `curriculum.stages` (a tuple of dicts, see `Stage`) trains each stage as an
ordinary run in its own workdir. Every `every` steps a stage evaluates and checkpoints;
each checkpoint carries `curriculum.metric` (an evaluation metric of the training loop:
`eval/nll_next`, `eval/average/accuracy`, ...), and the best one by `curriculum.mode`
is kept and starts the next stage. This is the step the public code leaves to a person
reading eval logs and editing a shell script.

    WORKDIR/chain.json          finished stages: chosen step, metric at every evaluation
    WORKDIR/chain_summary.json  per stage also the pick's inference cost, when the chain completes
    WORKDIR/stages/NN_NAME/     one training workdir per stage (checkpoints, metrics.jsonl, ...)
    WORKDIR/model/              the final plain LM when the last stage is lm or ntp

Running the same command again skips the stages chain.json lists and resumes the first
unfinished stage from its newest checkpoint (bit-identical, like a single run).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.inference.speed import generation_speed
from qstar_jax.models import model_files, sharding
from qstar_jax.training import checkpoint

CHAIN_FILE = "chain.json"
SUMMARY_FILE = "chain_summary.json"
MODEL_DIR = "model"
METHODS = ("lm", "quiet_star", "ntp")
MODES = ("min", "max")


class Selection(NamedTuple):
    """Which evaluation metric ranks a stage's checkpoints, and whether lower is better."""

    metric: str
    mode: str


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: a training run with these settings over the chain's base config."""

    name: str
    method: str  # "lm" | "quiet_star" | "ntp"
    steps: int
    learning_rate: float
    every: int  # evaluate and checkpoint every this many steps (and at the last)
    n_ahead: int | None = None  # quiet_star: thought length (official step counting)
    n_ahead_talk: int | None = None
    # ntp: the student starts from the teacher's LM ("teacher") or from the model the first
    # quiet_star stage started from ("base", as the public code does)
    student_init: str = "teacher"


def parse_stages(specs: tuple[dict[str, Any], ...]) -> list[Stage]:
    fields = {f.name for f in dataclasses.fields(Stage)}
    stages = []
    for i, spec in enumerate(specs):
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise UserError(f"curriculum stage {i + 1} has unknown keys: {', '.join(unknown)}")
        try:
            stage = Stage(**spec)
        except TypeError as e:
            raise UserError(f"curriculum stage {i + 1}: {e}") from None
        if stage.method not in METHODS:
            raise UserError(f"curriculum stage {stage.name!r}: method must be one of {METHODS}")
        if stage.steps < 1 or stage.every < 1:
            raise UserError(f"curriculum stage {stage.name!r}: steps and every must be >= 1")
        if stage.student_init not in ("teacher", "base"):
            raise UserError(f"curriculum stage {stage.name!r}: student_init must be 'teacher' or 'base'")
        if stage.method == "ntp" and (not stages or stages[-1].method != "quiet_star"):
            raise UserError(f"curriculum stage {stage.name!r}: an ntp stage must follow a quiet_star stage "
                            "(its teacher)")
        stages.append(stage)
    if len({s.name for s in stages}) != len(stages):
        raise UserError("curriculum stage names must be unique")
    return stages


def selection_metric(metrics: dict[str, float], name: str) -> float:
    """The value a checkpoint is ranked by: one of the metrics its evaluation produced."""
    if name not in metrics:
        raise UserError(f"curriculum.metric {name!r} is not among this stage's evaluation metrics "
                        f"({', '.join(sorted(metrics)) or 'none: set eval_batches or eval_tasks'})")
    return float(metrics[name])


def best_checkpoint(values: dict[int, float], mode: str) -> int:
    """The step with the best value (the earliest among equals)."""
    if not values:
        raise UserError("no checkpoint of the stage carries the selection metric")
    sign = 1.0 if mode == "min" else -1.0
    return min(values, key=lambda step: (sign * values[step], step))


def logged_values(stage_dir: str) -> dict[str, float]:
    """The selection metric at every evaluation of a stage, deleted checkpoints included."""
    values = {}
    for line in paths.read_text(paths.path(stage_dir) / "metrics.jsonl", "stage metrics").splitlines():
        record = json.loads(line)
        if checkpoint.SELECTION_METRIC in record:  # a resumed run may log a step twice, with the same value
            values[str(record["step"])] = record[checkpoint.SELECTION_METRIC]
    return values


def stage_config(cfg: ml_collections.ConfigDict, stage: Stage, init: tuple[str, int],
                 teacher: tuple[str, int] | None) -> ml_collections.ConfigDict:
    """The chain's config with the stage's settings, starting from `init` = (path, step)."""
    c = cfg.copy_and_resolve_references()
    c.curriculum.stages = ()
    c.method = stage.method
    c.steps = stage.steps
    c.optimizer.total_steps = 0  # the schedule follows the stage's steps
    c.optimizer.learning_rate = stage.learning_rate
    c.checkpoint_every = c.eval_every = stage.every
    if stage.n_ahead is not None:
        c.quiet_star.n_ahead = stage.n_ahead
    if stage.n_ahead_talk is not None:
        c.quiet_star.n_ahead_talk = stage.n_ahead_talk
    c.init_from, c.init_step = init
    if checkpoint.is_training_dir(c.init_from):
        c.tokenizer = ""  # a stage continues with its predecessor's tokenizer
    if teacher is not None:
        c.ntp.teacher, c.ntp.teacher_step = teacher
    return c


def _write_json(path: paths.PathLike, value: Any) -> None:
    """Written whole by process 0: a reader never sees half a file, a kill never leaves one."""
    if paths.is_writer():
        paths.write_text(path, json.dumps(value, indent=2))


def _finished_stages(workdir: str, stages: list[Stage]) -> list[dict[str, Any]]:
    path = paths.path(workdir) / CHAIN_FILE
    if not path.is_file():
        return []
    done = json.loads(path.read_text())["stages"]
    names = [s.name for s in stages]
    if [d["name"] for d in done] != names[: len(done)]:
        raise UserError(f"{path} records stages {[d['name'] for d in done]}, which do not begin the configured "
                        f"chain {names}; use a new --workdir")
    return done


def run_chain(cfg: ml_collections.ConfigDict, workdir: str,
              run_stage: Callable[[ml_collections.ConfigDict, str, Selection], bool]) -> None:
    """Runs (or resumes) every stage; `run_stage(cfg, workdir, selection)` trains one run and
    returns False if it was preempted (the chain then stops, to be resumed later)."""
    stages = parse_stages(cfg.curriculum.stages)
    # Only the final export reads params with it; with mesh.auto each stage chooses its own.
    mesh = sharding.make_mesh(1, -1, 1) if cfg.mesh.auto else sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp,
                                                                                   cfg.mesh.tensor)
    selection = Selection(cfg.curriculum.metric, cfg.curriculum.mode)
    if selection.mode not in MODES:
        raise UserError(f"curriculum.mode must be 'min' or 'max', got {selection.mode!r}")
    done = _finished_stages(workdir, stages)
    previous: tuple[str, int] | None = None  # (stage workdir, chosen step)
    thinking_base: tuple[str, int] | None = None  # where the first quiet_star stage started
    for i, stage in enumerate(stages):
        stage_dir = str(paths.path(workdir) / "stages" / f"{i + 1:02d}_{stage.name}")
        init = previous or (cfg.init_from, cfg.init_step)
        if stage.method == "quiet_star" and thinking_base is None:
            thinking_base = init
        teacher = previous if stage.method == "ntp" else None
        if stage.method == "ntp" and stage.student_init == "base":
            if not thinking_base[0]:
                raise UserError(f"stage {stage.name!r}: student_init='base' needs the first quiet_star stage to "
                                "start from a model (init_from or an lm stage), not a random init")
            init = thinking_base
        header = f"stage {i + 1}/{len(stages)} {stage.name} ({stage.method})"
        if i < len(done):
            previous = (stage_dir, done[i]["best_step"])
            print(f"{header}: done, best step {done[i]['best_step']} {selection.metric}={done[i]['value']:.4g}",
                  flush=True)
            continue
        print(f"{header}: {stage.steps} steps from {init[0] or 'a random init'}"
              + (f" step {init[1]}" if init[1] else ""), flush=True)
        if not run_stage(stage_config(cfg, stage, init, teacher), stage_dir, selection):
            print("chain stopped before its end; run the same command to continue", flush=True)
            return
        ckpt = checkpoint.open_run(stage_dir)
        kept = ckpt.metrics()  # the newest checkpoints and the best, each with its metric
        ckpt.close()
        best = best_checkpoint(kept, selection.mode)
        record = {"name": stage.name, "method": stage.method, "n_ahead": stage.n_ahead,
                  "n_ahead_talk": stage.n_ahead_talk, "dir": stage_dir, "best_step": best,
                  "metric": selection.metric, "value": kept[best], "values": logged_values(stage_dir)}
        done.append(record)
        _write_json(paths.path(workdir) / CHAIN_FILE, {"stages": done})
        print(f"{header}: best step {best} {selection.metric}={kept[best]:.4g}", flush=True)
        previous = (stage_dir, best)
    final_model = export_final_model(workdir, stages[-1], previous, mesh)
    # Timed together at the end, one after another, so the picks share the machine's conditions.
    summary = [{**d, **(generation_speed(d["dir"], d["best_step"], cfg.curriculum.bench_tokens)
                        if cfg.curriculum.bench_tokens > 0 else {})} for d in done]
    _write_json(paths.path(workdir) / SUMMARY_FILE, {"metric": selection.metric, "mode": selection.mode,
                                                      "final_model": final_model, "stages": summary})
    print(summary_table(summary, selection.metric), flush=True)


def export_final_model(workdir: str, stage: Stage, chosen: tuple[str, int], mesh) -> str | None:
    """The last stage's pick as a model directory (convert --to-hf reads it), if it is a plain
    LM; every process takes part (the params are sharded on the run's mesh)."""
    if stage.method == "quiet_star":
        return None
    model_dir = str(paths.path(workdir) / MODEL_DIR)
    if not model_files.is_model_dir(model_dir):
        config, _, params, tokenizer = checkpoint.load_for_inference(*chosen, mesh)
        model_files.save_model(model_dir, config, params, tokenizer)
    return model_dir


def summary_table(done: list[dict[str, Any]], metric: str) -> str:
    header = f"{'stage':<14}{'method':<12}{'n_ahead':>8}{'best step':>10}{metric:>16}{'passes/token':>14}"
    lines = [header + f"{'tokens/s':>10}"]
    for d in done:
        n_ahead = f"{d['n_ahead']}-{d['n_ahead_talk']}" if d["n_ahead"] else "-"
        lines.append(f"{d['name']:<14}{d['method']:<12}{n_ahead:>8}{d['best_step']:>10}{d['value']:>16.4f}"
                     f"{d.get('forward_passes_per_token', '-'):>14}{d.get('tokens_per_s', '-'):>10}")
    return "\n".join(lines)
