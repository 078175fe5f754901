"""Fast Quiet-STaR's NTP stage in miniature: does a thought-free student keep the teacher's gain?

    python -m qstar_jax.toy_ntp_study --workdir runs/toy_ntp_study [--seeds 0,1,2]
        [--readme README.md] [--plot docs/toy_ntp_study.png] [--smoke]

1. pretrains a base LM on chains of NUM_OPS operations modulo 10, half of them with the
   working written out (experiments/toy_reasoning_base.py), and exports it;
2. per seed, from that base: the teacher (Quiet-STaR on implicit documents, thoughts long
   enough for the whole working) and the matched control (plain next-token training on
   the same documents for the teacher's and the student's steps together); from the
   teacher's checkpoint: one NTP student per objective (`ntp.form` paper, code, kl) and
   the teacher's LM trained on without a teacher for the same steps (what a student gets
   from its initialisation alone);
3. scores every checkpoint on held-out test problems (answer accuracy and NLL; the
   teacher thinks, and how often its thought is the working; nothing else thinks) and
   times greedy decoding of the base, the teacher and a student. The test questions are
   of the "test" split (toy/reasoning.py), and before any training the study asserts
   that none of them occurs in the documents any run's config would train on;
4. writes WORKDIR/results.json, the README table and the plot.

docs/toy_experiment.md ("Fast Quiet-STaR NTP") gives the design and the verdict.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from qstar_jax.errors import exit_on_user_error
from qstar_jax.inference import speed
from qstar_jax.toy import reasoning as toy_reasoning
from qstar_jax.toy.eval import answer_metrics, explicit_accuracy
from qstar_jax.toy.study import ARM_CONFIG, BASE_CONFIG, SMOKE_ARM, SMOKE_BASE, TEST_PROBLEMS, TEST_SEED, score_run, summarise
from qstar_jax.toy.runs import (
    export_base, make_workdir, run_study, save_figure, study_parser, train, training_documents,
)
from qstar_jax.training import checkpoint

NUM_OPS = 3  # a 2-layer model answers 0.27 of 3-op chains without working, all of them with it
TEACHER_STEPS = STUDENT_STEPS = 200
# Chosen on development problems (300, seed 2, seed-0 runs; drawn before splits existed, so
# 241 of them were training questions too): the teacher and the control keep the arms' 1e-4
# (the control reached 0.250 there, 0.233 at 1e-3; faster rates wear the teacher's working
# away); the students train at 1e-3. A retune would draw them from split "dev".
STUDENT_LR = 1e-3
FORMS = ("paper", "code", "kl")
# The code form as the public code runs it: rewards clamped at 0. Every form keeps weight 1
# and the students' learning rate (the public code's 1e6 pairs with its lr 1e-6).
FORM_OVERRIDES = {"code": ["--config.ntp.clip_negative_rewards=True"]}
MARKERS = ("<!-- toy-ntp-table:start -->", "<!-- toy-ntp-table:end -->")
DEFAULT_PLOT = "docs/toy_ntp_study.png"
SPEED_TOKENS = 64
COMMON = [f"--config.data.toy.num_ops={NUM_OPS}", f"--config.quiet_star.n_ahead={NUM_OPS + 3}",
          "--config.checkpoint_every=50"]
ARM_LABELS = {
    "base": "base model, untouched",
    "control": "next-token control (teacher's + student's steps)",
    "teacher": "teacher: Quiet-STaR, thinking",
    "lm_from_teacher": "teacher's LM trained on without a teacher",
    **{f"student_{form}": f"NTP student, `ntp.form={form}`" for form in FORMS},
}


def arm_runs(seeds: list[int], base_model: str, workdir: str) -> list[dict]:
    """Per seed, in dependency order: the teacher first (the students start from it)."""
    def steps(n: int) -> list[str]:
        return [f"--config.steps={n}", f"--config.optimizer.total_steps={n}"]

    student_lr = f"--config.optimizer.learning_rate={STUDENT_LR}"
    runs = []
    for seed in seeds:
        teacher = os.path.join(workdir, f"teacher_seed{seed}")
        from_teacher = [f"--config.init_from={teacher}", *steps(STUDENT_STEPS), student_lr]
        runs.append({"arm": "teacher", "seed": seed, "name": f"teacher_seed{seed}",
                     "overrides": [f"--config.init_from={base_model}", *steps(TEACHER_STEPS)]})
        runs.append({"arm": "control", "seed": seed, "name": f"control_seed{seed}",
                     "overrides": ["--config.method=lm", f"--config.init_from={base_model}",
                                   *steps(TEACHER_STEPS + STUDENT_STEPS)]})
        runs.append({"arm": "lm_from_teacher", "seed": seed, "name": f"lm_from_teacher_seed{seed}",
                     "overrides": ["--config.method=lm", *from_teacher]})
        for form in FORMS:
            runs.append({"arm": f"student_{form}", "seed": seed, "name": f"student_{form}_seed{seed}",
                         "overrides": ["--config.method=ntp", f"--config.ntp.teacher={teacher}",
                                       f"--config.ntp.form={form}", *FORM_OVERRIDES.get(form, []), *from_teacher]})
    for run in runs:
        run["overrides"] = [*COMMON, f"--config.seed={run['seed']}", *run["overrides"]]
    return runs


def check_test_set(items: list[toy_reasoning.Problem], runs: list[tuple[str, str, list[str]]]) -> list[str]:
    """Raises HeldOutLeak when a test question occurs in the training documents of any run
    (name, config file, overrides); returns the names checked. Runs whose configs read the
    same data share one check."""
    checked: set[str] = set()
    for name, config_file, overrides in runs:
        data_settings = repr((config_file, [o for o in overrides if o.startswith("--config.data.")]))
        if data_settings not in checked:
            toy_reasoning.check_held_out(items, training_documents(config_file, overrides),
                                         f"test problems against run {name}'s training documents")
            checked.add(data_settings)
    return [name for name, _, _ in runs]


def gain_kept(summary: dict) -> dict:
    """Per student: (student - control) / (teacher - control) in accuracy, the share of the
    teacher's gain over the matched control that survives without thoughts."""
    teacher, control = summary["teacher"]["accuracy"]["mean"], summary["control"]["accuracy"]["mean"]
    gain = teacher - control
    return {arm: (summary[arm]["accuracy"]["mean"] - control) / gain if gain > 0 else None
            for arm in summary if arm.startswith("student_") or arm == "lm_from_teacher"}


def aggregate(results: dict) -> dict:
    final: dict[str, list[dict]] = {}
    for run in results["runs"]:
        final.setdefault(run["arm"], []).append(run["curve"][str(max(map(int, run["curve"])))])
    summary = {arm: {k: summarise([m[k] for m in ms]) for k in ("accuracy", "answer_nll")} for arm, ms in final.items()}
    summary["base"] = {k: summarise([results["base"][k]]) for k in ("accuracy", "answer_nll")}
    return summary


ORDER = ("base", "control", "lm_from_teacher", *(f"student_{f}" for f in FORMS), "teacher")


def table(results: dict) -> str:
    summary, kept, speed = results["summary"], results["gain_kept"], results["speed"]
    lines = [f"| arm | answer accuracy (mean ± std, {len(results['seeds'])} seeds) | answer NLL, nats | "
             "share of the teacher's gain over the control kept | decoding tokens/s |", "|---|---|---|---|---|"]
    for arm in ORDER:
        acc, nll = summary[arm]["accuracy"], summary[arm]["answer_nll"]
        spread = (lambda m: f"{m['mean']:.3f}") if arm == "base" else (lambda m: f"{m['mean']:.3f} ± {m['std']:.3f}")
        share = f"{kept[arm]:+.2f}" if kept.get(arm) is not None else "–"
        tokens_per_s = f"{speed[arm]['tokens_per_s']:,.0f}" if arm in speed else "–"
        lines.append(f"| {ARM_LABELS[arm]} | {spread(acc)} | {spread(nll)} | {share} | {tokens_per_s} |")
    lines.append(f"| base model writing the working out itself (reference) | "
                 f"{results['base_explicit']['explicit_accuracy']:.3f} | – | – | – |")
    return "\n".join(lines)


def caption(results: dict) -> str:
    return (f"{results['test_problems']} held-out test problems of {NUM_OPS} operations (split test, seed "
            f"{TEST_SEED}: none in any run's training documents); "
            f"teacher {TEACHER_STEPS} Quiet-STaR steps from the base, students {STUDENT_STEPS} steps from the "
            f"teacher, control {TEACHER_STEPS + STUDENT_STEPS} steps from the base; seeds "
            f"{', '.join(map(str, results['seeds']))}; chance accuracy 0.100. Decoding: greedy, batch 1, "
            f"{SPEED_TOKENS} new tokens, median of {speed.BENCH_REPEATS} alternating runs (seed "
            f"{results['seeds'][0]}'s runs; a student has the base model's architecture). Whole study: "
            f"{results['wall_s'] / 60:.1f} min on this machine (`{results['command']}`).")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for color, arm in zip(plt.cm.tab10.colors, ORDER[1:]):
        runs = [run for run in results["runs"] if run["arm"] == arm]
        offset = TEACHER_STEPS if arm.startswith("student_") or arm == "lm_from_teacher" else 0
        steps = sorted(int(s) for s in runs[0]["curve"])
        for ax, key in zip(axes, ("accuracy", "answer_nll")):
            values = np.array([[run["curve"][str(s)][key] for s in steps] for run in runs])
            mean = values.mean(axis=0)
            std = values.std(axis=0, ddof=1) if len(runs) > 1 else 0 * mean
            x = [s + offset for s in steps]
            ax.plot(x, mean, color=color, label=ARM_LABELS[arm].replace("`", ""))
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
    for ax, key, label in zip(axes, ("accuracy", "answer_nll"), ("held-out answer accuracy", "answer NLL (nats)")):
        ax.axhline(results["base"][key], color="gray", linestyle=":", label="base model")
        ax.set(xlabel="optimizer steps from the base (students: after the teacher's)", ylabel=label)
    axes[0].legend(fontsize=7)
    save_figure(fig, f"Fast Quiet-STaR NTP on {NUM_OPS}-operation chains: mean ± std over seeds {results['seeds']}",
                path)


def study(workdir: str, seeds: list[int], smoke: bool) -> dict:
    start = time.perf_counter()
    make_workdir(workdir)
    workdir = os.path.abspath(workdir)
    cache_dir = os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    base_run, base_model = os.path.join(workdir, "base"), os.path.join(workdir, "base_model")
    base_steps = [] if smoke else ["--config.steps=1000", "--config.optimizer.total_steps=1000"]
    base_overrides = [f"--config.data.toy.num_ops={NUM_OPS}", *base_steps, *(SMOKE_BASE if smoke else [])]
    runs = [{**run, "overrides": [*run["overrides"], *(SMOKE_ARM if smoke else [])]}
            for run in arm_runs(seeds, base_model, workdir)]
    items = toy_reasoning.problems(40 if smoke else TEST_PROBLEMS, TEST_SEED, NUM_OPS, split="test")
    checked = check_test_set(items, [("base", BASE_CONFIG, base_overrides),
                                     *((run["name"], ARM_CONFIG, run["overrides"]) for run in runs)])
    print(f"[toy_ntp_study] pretraining the base model in {base_run}", flush=True)
    train(BASE_CONFIG, base_run, base_overrides, cache_dir)
    export_base(base_run, base_model)
    config, _, params, tokenizer = checkpoint.load_for_inference(base_model)
    results = {"seeds": seeds, "test_problems": len(items), "num_ops": NUM_OPS,
               "test_split": {"split": "test", "seed": TEST_SEED, "checked_against": checked},
               "base": answer_metrics(config, None, params, tokenizer, items, thinking=False),
               "base_explicit": explicit_accuracy(config, None, params, tokenizer, items), "runs": []}
    for run in runs:
        run_dir = os.path.join(workdir, run["name"])
        train_s = train(ARM_CONFIG, run_dir, run["overrides"], cache_dir)
        curve = score_run(run_dir, items, run["seed"])
        results["runs"].append({**run, "train_s": train_s, "curve": {str(k): v for k, v in curve.items()}})
        print(f"[toy_ntp_study] {run['name']}: accuracy {curve[max(curve)]['accuracy']:.3f} ({train_s:.0f} s)",
              flush=True)
    results["summary"] = aggregate(results)
    results["gain_kept"] = gain_kept(results["summary"])
    first = seeds[0]
    timed = {"base": base_model, "teacher": os.path.join(workdir, f"teacher_seed{first}"),
             "student_paper": os.path.join(workdir, f"student_paper_seed{first}")}
    results["speed"] = speed.generation_speeds({arm: (path, None) for arm, path in timed.items()}, SPEED_TOKENS)
    results["wall_s"] = time.perf_counter() - start
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    return study_parser("qstar_jax.toy_ntp_study", __doc__.splitlines()[0], "runs/toy_ntp_study",
                        "the teacher, control and students", "NTP table", DEFAULT_PLOT).parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_study("qstar_jax.toy_ntp_study", argv, args, MARKERS, lambda: study(args.workdir, args.seeds, args.smoke),
              lambda results: f"{table(results)}\n\n{caption(results)}", plot)
