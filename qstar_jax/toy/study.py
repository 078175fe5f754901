"""The miniature Quiet-STaR replication, end to end: `python -m qstar_jax.toy_study`.

    python -m qstar_jax.toy_study --workdir runs/toy_study [--variant written|aside]
        [--seeds 0,1,2] [--n-ahead 4,8] [--readme README.md] [--plot PNG] [--smoke]

1. pretrains a base LM on toy-reasoning text, half of it with the working written out
   (experiments/toy_reasoning_base.py), and exports it as a model directory. Variant
   `aside`: some open "---" on an unrelated aside and most write the working after "::"
   instead, so a thought (which starts from "---") starts out wrong;
2. from that one base, for each seed: continues on implicit documents only with
   Quiet-STaR (one run per thought length), with Quiet-STaR minus its policy loss
   (weight 0, longest thought: the mixing head and the NLL terms alone; the ablation
   that isolates REINFORCE) and with plain next-token training (the control), same
   documents, steps and optimizer (experiments/toy_reasoning.py);
3. scores every saved checkpoint on held-out test problems (answer accuracy and answer
   NLL; thinking arms think before the answer, and how often their sampled thought is
   the working), the base untouched, the thoughts a Quiet-STaR run starts from, and the
   base writing the working out itself;
4. writes WORKDIR/results.json, the table (README between the variant's markers, and
   printed), and the plot of accuracy / NLL / thought correctness against training step.

Every run is an ordinary `qstar_jax.train` subprocess in its own directory, so an
interrupted study resumes where it stopped; the runs share one JAX compilation cache
(WORKDIR/jax_cache), so seeds after the first do not compile again. `--smoke` is a
seconds-long miniature for the test suite (its numbers mean nothing).
docs/toy_experiment.md explains the design.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NamedTuple

import jax
import numpy as np

from qstar_jax.errors import exit_on_user_error
from qstar_jax.toy import reasoning as toy_reasoning
from qstar_jax.toy.eval import answer_metrics, explicit_accuracy, sample_thoughts, thought_accuracy
from qstar_jax.toy.runs import REPO, export_base, int_list, make_workdir, run_study, save_figure, study_parser, train
from qstar_jax.training import checkpoint

BASE_CONFIG = os.path.join(REPO, "experiments", "toy_reasoning_base.py")
ARM_CONFIG = os.path.join(REPO, "experiments", "toy_reasoning.py")
TEST_SEED = 3  # train: 0 (base) and 1 (arms); development: 2; test: 3
TEST_PROBLEMS = 500


class Variant(NamedTuple):
    """What a study's base model is pretrained on, and where its report goes."""

    base_overrides: tuple[str, ...]
    table_start: str
    table_end: str
    plot: str
    n_ahead: str
    working_marker: str  # what the reference row prompts with: the marker that opens the working
    policy_loss_weight: float  # of the Quiet-STaR arms (the policy-off arm has 0)
    thinking_overrides: tuple[str, ...]  # of both thinking arms, (a) and its policy-off ablation (b)

    @property
    def markers(self) -> tuple[str, str]:
        return self.table_start, self.table_end


VARIANTS = {
    # "---" always opens the working: thoughts are right from the start (docs/toy_experiment.md).
    "written": Variant((), "<!-- toy-study-table:start -->", "<!-- toy-study-table:end -->",
                       "docs/toy_study.png", "4,6,8", toy_reasoning.DELIMITER, 1.0, ()),
    # 80% of the documents are explicit: 30% of those open "---" on an unrelated aside, 17.5%
    # on the working, 52.5% write the working after "::" (docs/toy_experiment.md). Policy
    # weight 1000 (development problems): at 1 the reward, scaled by a mixing weight near 0,
    # is too weak against the NLL terms and the few right thoughts are lost. A non-negative
    # mixing weight (development problems): unsquashed, it turned negative in one seed in
    # three before the thoughts were reliable, and the reward then favoured the worst ones.
    # With it both thinking arms differ from the official head in the same way.
    "aside": Variant(("--config.data.toy.explicit_fraction=0.8", "--config.data.toy.aside_fraction=0.3",
                      "--config.data.toy.delimiter_fraction=0.25"),
                     "<!-- toy-study-aside-table:start -->", "<!-- toy-study-aside-table:end -->",
                     "docs/toy_study_aside.png", "8", toy_reasoning.OTHER_MARKER, 1000.0,
                     ("--config.quiet_star.nonnegative_mixing_weight=True",)),
}
TABLE_START, TABLE_END = VARIANTS["written"].table_start, VARIANTS["written"].table_end
SMOKE_BASE = ["--config.steps=6", "--config.data.toy.problems=300", "--config.batch_size=8",
              "--config.data.eval_documents=20", "--config.eval_every=0", "--config.checkpoint_every=6",
              "--config.optimizer.total_steps=6", "--config.model.hidden_size=32", "--config.model.head_dim=8",
              "--config.model.intermediate_size=64", "--config.data.seq_len=32"]
SMOKE_ARM = ["--config.steps=4", "--config.checkpoint_every=2", "--config.data.toy.problems=200",
             "--config.data.eval_documents=20", "--config.batch_size=4", "--config.optimizer.total_steps=4",
             "--config.data.seq_len=32"]


# ----------------------------------------------------------------------------------- runs


def arm_runs(seeds: list[int], n_aheads: list[int], policy_loss_weight: float = 1.0,
             thinking_overrides: tuple[str, ...] = ()) -> list[dict]:
    """Per seed: the control, Quiet-STaR at each thought length, and Quiet-STaR with the
    policy loss off at the longest; `thinking_overrides` go to both thinking arms alike."""
    longest = max(n_aheads)
    runs = []
    for seed in seeds:
        runs.append({"arm": "ntp", "seed": seed, "name": f"ntp_seed{seed}",
                     "overrides": ["--config.method=lm", f"--config.seed={seed}"]})
        for n_ahead in n_aheads:
            runs.append({"arm": f"quiet_star_{n_ahead}", "seed": seed, "name": f"qs{n_ahead}_seed{seed}",
                         "overrides": [f"--config.seed={seed}", f"--config.quiet_star.n_ahead={n_ahead}", *thinking_overrides,
                                       f"--config.quiet_star.policy_loss_weight={policy_loss_weight}"]})
        runs.append({"arm": f"policy_off_{longest}", "seed": seed, "name": f"nopolicy{longest}_seed{seed}",
                     "overrides": [f"--config.seed={seed}", f"--config.quiet_star.n_ahead={longest}", *thinking_overrides,
                                   "--config.quiet_star.policy_loss_weight=0"]})
    return runs


def initial_thoughts(base_model: str, n_ahead: int, items) -> dict:
    """How often the thought after "=" is the working when a Quiet-STaR run starts: the
    base LM with start/end embeddings from "---", exactly as `train` builds them."""
    from experiments.toy_reasoning import get_config
    from qstar_jax.training.setup import add_thoughts

    cfg = get_config()
    cfg.quiet_star.n_ahead = n_ahead
    config, _, params, tokenizer = checkpoint.load_for_inference(base_model)
    config, qs, params = add_thoughts(config, params, tokenizer, cfg)
    return thought_accuracy(config, qs, params, tokenizer, items)


# ----------------------------------------------------------------------------------- eval


def score_run(run_dir: str, items, seed: int) -> dict[int, dict]:
    """Metrics at every checkpoint of a run: {step: {accuracy, answer_nll, ...}}."""
    ckpt = checkpoint.open_run(run_dir)
    steps = ckpt.steps()
    ckpt.close()
    curve = {}
    for step in steps:
        config, qs, params, tokenizer = checkpoint.load_for_inference(run_dir, step)
        curve[step] = answer_metrics(config, qs, params, tokenizer, items, thinking=qs is not None, seed=seed)
        if qs is not None:
            curve[step].update(thought_accuracy(config, qs, params, tokenizer, items, seed=seed))
    return curve


def summarise(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": [float(v) for v in values]}


def aggregate(results: dict) -> dict:
    """Per arm, the final-step metrics over seeds (mean, sample std)."""
    final = {}
    for run in results["runs"]:
        last = run["curve"][str(max(map(int, run["curve"])))]
        final.setdefault(run["arm"], []).append(last)
    out = {arm: {k: summarise([m[k] for m in ms]) for k in METRICS if k in ms[0]} for arm, ms in final.items()}
    base = results["base"]
    out["base"] = {k: summarise([base[k]]) for k in ("accuracy", "answer_nll")}
    return out


METRICS = ("accuracy", "answer_nll", "thought_exact")


def policy_gain(results: dict) -> dict:
    """Quiet-STaR minus its policy-off ablation at the longest thought, per metric: the
    difference of the means and how many (larger) standard deviations it spans."""
    longest = max(results["n_ahead"])
    with_policy, without = results["summary"][f"quiet_star_{longest}"], results["summary"][f"policy_off_{longest}"]
    gain = {}
    for key in ("accuracy", "thought_exact"):
        diff = with_policy[key]["mean"] - without[key]["mean"]
        spread = max(with_policy[key]["std"], without[key]["std"])
        gain[key] = {"difference": diff, "in_std": diff / spread if spread > 0 else None}  # None: one seed
    return gain


def _in_std(gain: dict) -> str:
    return "std undefined" if gain["in_std"] is None else f"{gain['in_std']:.1f} std"


# -------------------------------------------------------------------------------- report


ARM_LABELS = {"base": "(d) base model, untouched", "ntp": "(c) next-token continued training (control)"}


def arm_label(arm: str) -> str:
    if arm.startswith(("quiet_star_", "policy_off_")):
        n_ahead = int(arm.rsplit("_", 1)[1])
        sampled = n_ahead - 3
        length = f"n_ahead {n_ahead} ({sampled} thought token{'s' if sampled != 1 else ''})"
        if arm.startswith("policy_off_"):
            return f"(b) Quiet-STaR without the policy loss, {length}"
        return f"(a) Quiet-STaR, {length}"
    return ARM_LABELS[arm]


def arm_order(arms) -> list[str]:
    n_ahead = lambda a: int(a.rsplit("_", 1)[1])  # noqa: E731
    return (["base", "ntp"] + sorted((a for a in arms if a.startswith("policy_off_")), key=n_ahead)
            + sorted((a for a in arms if a.startswith("quiet_star_")), key=n_ahead))


def _spread(metric: dict, arm: str) -> str:
    """mean ± std over seeds; the untouched base is one model, so just its value."""
    return f"{metric['mean']:.3f}" if arm == "base" else f"{metric['mean']:.3f} ± {metric['std']:.3f}"


def table(results: dict) -> str:
    summary = results["summary"]
    seeds = len(results["seeds"])
    lines = [
        f"| arm | answer accuracy (mean ± std, {seeds} seeds) | answer NLL, nats (mean ± std) "
        "| sampled thought = working |",
        "|---|---|---|---|",
    ]
    for arm in arm_order(summary):
        acc, nll = summary[arm]["accuracy"], summary[arm]["answer_nll"]
        if "thought_exact" in summary[arm]:
            thought = _spread(summary[arm]["thought_exact"], arm)
        elif arm == "base":
            thought = f"{results['initial_thoughts']['thought_exact']:.3f} (thoughts a run starts from)"
        else:
            thought = "–"
        lines.append(f"| {arm_label(arm)} | {_spread(acc, arm)} | {_spread(nll, arm)} | {thought} |")
    explicit = results["base_explicit"]
    lines.append(f"| base model writing the working out itself (reference) | {explicit['explicit_accuracy']:.3f} "
                 f"| – | {explicit['working_exact']:.3f} (greedy) |")
    return "\n".join(lines)


def caption(results: dict) -> str:
    gain = results["policy_gain"]
    return (f"{results['test_problems']} held-out test problems (seed {TEST_SEED}), {results['steps']} optimizer "
            f"steps per arm from one base model, seeds {', '.join(map(str, results['seeds']))}; chance accuracy 0.100. "
            f"The policy loss, (a) minus (b) at the longest thought: answer accuracy "
            f"{gain['accuracy']['difference']:+.3f} ({_in_std(gain['accuracy'])}), sampled thought = working "
            f"{gain['thought_exact']['difference']:+.3f} ({_in_std(gain['thought_exact'])}; std: the larger "
            f"of the two arms' over seeds).{_thinking_note(results)} Whole study: {results['wall_s'] / 60:.1f} min on this machine "
            f"(`{results['command']}`).")


def _thinking_note(results: dict) -> str:
    overrides = results.get("thinking_overrides") or []
    return f" Both thinking arms run with {', '.join(f'`{o}`' for o in overrides)}." if overrides else ""


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    arms = arm_order({run["arm"] for run in results["runs"]})[1:]
    panels = (("accuracy", "held-out answer accuracy"), ("answer_nll", "held-out answer NLL (nats)"),
              ("thought_exact", "sampled thought = working"))
    for color, arm in zip(plt.cm.tab10.colors, arms):
        runs = [run for run in results["runs"] if run["arm"] == arm]
        steps = sorted(int(s) for s in runs[0]["curve"])
        for ax, (key, _) in zip(axes, panels):
            if key not in runs[0]["curve"][str(steps[0])]:
                continue
            start = results["initial_thoughts"][key] if key == "thought_exact" else results["base"][key]
            values = np.array([[start] + [run["curve"][str(s)][key] for s in steps] for run in runs])
            mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(runs) > 1 else 0 * values[0]
            x = [0] + steps
            ax.plot(x, mean, color=color, label=arm_label(arm))
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
    explicit = results["base_explicit"]["explicit_accuracy"]
    axes[0].axhline(explicit, color="gray", linestyle="--", label="base, working written out")
    axes[0].axhline(0.1, color="gray", linestyle=":", label="chance")
    for ax, (key, label) in zip(axes, panels):
        ax.set(xlabel="optimizer step", ylabel=label)
        if key != "answer_nll":
            ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    save_figure(fig, f"Toy reasoning ({results['variant']}): mean ± std over seeds {results['seeds']}, "
                f"{results['test_problems']} test problems", path)


# --------------------------------------------------------------------------------- study


def study(workdir: str, variant_name: str, seeds: list[int], n_aheads: list[int], smoke: bool) -> dict:
    """The whole study in `workdir`: pretrain and export the base model, train every arm for
    every seed, score each on the held-out problems; returns the results that `publish`
    writes to the README and plot."""
    start = time.perf_counter()
    variant = VARIANTS[variant_name]
    make_workdir(workdir)
    cache_dir = os.path.join(os.path.abspath(workdir), "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache_dir)  # the scoring below, too
    base_run, base_model = os.path.join(workdir, "base"), os.path.join(workdir, "base_model")
    print(f"[toy_study] pretraining the base model in {base_run}", flush=True)
    base_s = train(BASE_CONFIG, base_run, [*variant.base_overrides, *(SMOKE_BASE if smoke else [])], cache_dir)
    export_base(base_run, base_model)
    count = 40 if smoke else TEST_PROBLEMS
    items = toy_reasoning.problems(count, TEST_SEED)
    toy_reasoning.write_problems(os.path.join(workdir, "test.jsonl"), items)

    config, _, params, tokenizer = checkpoint.load_for_inference(base_model)
    results = {
        "variant": variant_name, "base_overrides": list(variant.base_overrides),
        "thinking_overrides": list(variant.thinking_overrides), "seeds": seeds, "n_ahead": n_aheads, "test_problems": count, "base_train_s": base_s,
        "base": answer_metrics(config, None, params, tokenizer, items, thinking=False),
        "base_explicit": explicit_accuracy(config, None, params, tokenizer, items, variant.working_marker),
        "initial_thoughts": initial_thoughts(base_model, max(n_aheads), items),
        "runs": [],
    }
    print(f"[toy_study] at the start of a Quiet-STaR run the thought after '=' is the working for "
          f"{results['initial_thoughts']['thought_exact']:.3f} of the test problems", flush=True)
    for run in arm_runs(seeds, n_aheads, variant.policy_loss_weight, variant.thinking_overrides):
        run_dir = os.path.join(workdir, run["name"])
        print(f"[toy_study] {run['name']}", flush=True)
        overrides = [f"--config.init_from={base_model}", *run["overrides"], *(SMOKE_ARM if smoke else [])]
        train_s = train(ARM_CONFIG, run_dir, overrides, cache_dir)
        curve = score_run(run_dir, items, run["seed"])
        results["runs"].append({**run, "train_s": train_s, "curve": {str(k): v for k, v in curve.items()}})
        print(f"[toy_study] {run['name']}: final accuracy {curve[max(curve)]['accuracy']:.3f}, "
              f"answer NLL {curve[max(curve)]['answer_nll']:.3f} ({train_s:.0f} s)", flush=True)
    results["steps"] = max(int(s) for s in results["runs"][0]["curve"])
    results["summary"] = aggregate(results)
    results["policy_gain"] = policy_gain(results)
    results["sample_thoughts"] = {}
    for n_ahead in n_aheads:  # what each thought length thinks, in the last seed's run
        name = f"qs{n_ahead}_seed{seeds[-1]}"
        config, qs, params, tokenizer = checkpoint.load_for_inference(os.path.join(workdir, name))
        results["sample_thoughts"][name] = sample_thoughts(config, qs, params, tokenizer, items[:8])
    results["wall_s"] = time.perf_counter() - start
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = study_parser("qstar_jax.toy_study", __doc__.splitlines()[0], "runs/toy_study",
                          "the continued-training arms", "toy-study table", None, "default: the variant's, under docs/")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="written",
                        help="written: '---' always opens the working; aside: only some of the time")
    parser.add_argument("--n-ahead", type=int_list, help="comma-separated thought lengths (n_ahead); default: the variant's")
    args = parser.parse_args(argv)
    variant = VARIANTS[args.variant]
    args.plot = variant.plot if args.plot is None else args.plot
    args.n_ahead = args.n_ahead or int_list(variant.n_ahead)
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_study("qstar_jax.toy_study", argv, args, VARIANTS[args.variant].markers,
              lambda: study(args.workdir, args.variant, args.seeds, args.n_ahead, args.smoke),
              lambda results: f"{table(results)}\n\n{caption(results)}", plot)


