"""The think-gate study's report: per-arm summaries over seeds, the acceptance verdict, the
README tables and the plot (qstar_jax/toy/gate_study.py runs the study)."""

from __future__ import annotations

from qstar_jax.inference.speed import paired_speedup
from qstar_jax.toy.runs import save_figure
from qstar_jax.toy.study import summarise

MARKERS = ("<!-- gate-study-table:start -->", "<!-- gate-study-table:end -->")
DEFAULT_PLOT = "docs/gate_study.png"
METRICS = {"toy": ("accuracy", "answer_nll", "thinking_share", "answer_thought"), "corpus": ("nll", "thinking_share")}
KEPT_GAIN, CLEAR_STD, SPEEDUP, MAX_SHARE = 0.95, 2.0, 3.0, 0.2  # the acceptance bars (issue 17)


def aggregate(results: dict) -> dict:
    """{text: {arm: {metric: mean, std, values}}} over seeds."""
    by_arm: dict = {}
    for run in results["runs"]:
        for arm, metrics in run["scores"].items():
            by_arm.setdefault(run["text"], {}).setdefault(arm, []).append(metrics)
    return {text: {arm: {k: summarise([m[k] for m in ms]) for k in METRICS[text] if k in ms[0]}
                   for arm, ms in arms.items()}
            for text, arms in by_arm.items()}


def _kept(summary: dict, arm: str) -> float | None:
    """Share of the every-position accuracy gain over the control that `arm` keeps."""
    gain = summary["every"]["accuracy"]["mean"] - summary["control"]["accuracy"]["mean"]
    return (summary[arm]["accuracy"]["mean"] - summary["control"]["accuracy"]["mean"]) / gain if gain > 0 else None


def verdict(results: dict) -> dict:
    """Per share on the toy task: the gain each selection keeps, how far gate and random
    lie apart in standard deviations (the larger arm's over seeds), the gate's measured
    thinking share, its speed-up over every-position generation, and whether all of the
    issue's bars hold."""
    toy, out = results["summary"]["toy"], {}
    for share in results["shares"]:
        gate, rand = toy[f"gate_{share:g}"], toy[f"random_{share:g}"]
        spread = max(gate["accuracy"]["std"], rand["accuracy"]["std"])
        apart = (gate["accuracy"]["mean"] - rand["accuracy"]["mean"]) / spread if spread > 0 else None
        speedup = paired_speedup(results["speed"][f"gate_{share:g}"], results["speed"]["every"])
        kept = _kept(toy, f"gate_{share:g}")
        out[f"{share:g}"] = {
            "gate_kept": kept, "random_kept": _kept(toy, f"random_{share:g}"), "gate_minus_random_in_std": apart,
            "gate_thinking_share": gate["thinking_share"]["mean"], "speedup_over_every": speedup,
            "holds": bool(kept is not None and apart is not None and kept >= KEPT_GAIN and apart > CLEAR_STD
                          and speedup >= SPEEDUP and gate["thinking_share"]["mean"] <= MAX_SHARE)}
    return out


# --------------------------------------------------------------------------------- tables


def _by_share(summary: dict, kind: str) -> list[str]:
    """The arms of one kind (gate, random, every_gated), by share."""
    return sorted((a for a in summary if a.startswith(f"{kind}_")), key=lambda a: float(a.rsplit("_", 1)[1]))


def _arms(summary: dict) -> list[str]:
    """control, then the gate, random and gate-at-inference-only arms by share, every position."""
    return ["control", *_by_share(summary, "gate"), *_by_share(summary, "random"), *_by_share(summary, "every_gated"),
            "every"]


def _spread(metric: dict) -> str:
    return f"{metric['mean']:.3f} ± {metric['std']:.3f}"


LABELS = {"control": "control: next-token training, no thoughts", "every": "Quiet-STaR, thinking at every position"}


def _label(arm: str) -> str:
    if arm in LABELS:
        return LABELS[arm]
    kind, share = arm.rsplit("_", 1)
    return {"gate": f"gate: trained at {share} of positions, thinks where the gate predicts the most gain",
            "random": f"random: trained and thinking at a random {share} of positions",
            "every_gated": f"every-position training, gate at inference only ({share})"}[kind]


def toy_table(results: dict) -> str:
    summary, speeds = results["summary"]["toy"], results["speed"]
    lines = ["| toy task, 5-token thoughts | positions that think | answer accuracy | answer NLL (nats) "
             "| answers thought before | decoding tokens/s (thoughts per token) |", "|---|---|---|---|---|---|"]
    for arm in _arms(summary):
        s = summary[arm]
        tokens = (f"{speeds[arm]['tokens_per_s']:.0f} ({speeds[arm]['thoughts_per_token']:.2f})" if arm in speeds
                  else "–")
        lines.append(f"| {_label(arm)} | {_spread(s['thinking_share'])} | {_spread(s['accuracy'])} "
                     f"| {_spread(s['answer_nll'])} | {_spread(s['answer_thought'])} | {tokens} |")
    return "\n".join(lines)


def corpus_table(results: dict) -> str:
    summary = results["summary"]["corpus"]
    lines = ["| tiny_cpu corpus | positions that think | held-out NLL per token (nats) |", "|---|---|---|"]
    for arm in _arms(summary):
        lines.append(f"| {_label(arm)} | {_spread(summary[arm]['thinking_share'])} | {_spread(summary[arm]['nll'])} |")
    return "\n".join(lines)


def _in_std(value: float | None) -> str:
    return "std undefined" if value is None else f"{value:.1f} std"


def caption(results: dict) -> str:
    parts = []
    for share, v in results["verdict"].items():
        kept = "undefined" if v["gate_kept"] is None else f"{v['gate_kept']:.0%}"
        rand = "undefined" if v["random_kept"] is None else f"{v['random_kept']:.0%}"
        parts.append(f"at {share}, the gate (thinking at {v['gate_thinking_share']:.1%} of test positions) keeps "
                     f"{kept} of the every-position accuracy gain over the control, random selection {rand} "
                     f"(gate − random: {_in_std(v['gate_minus_random_in_std'])}), and gated decoding runs "
                     f"{v['speedup_over_every']:.1f}× as fast as every-position thinking")
    return (f"Mean ± std over seeds {', '.join(map(str, results['seeds']))}; {results['test_problems']} held-out "
            f"toy problems (seed 3, thresholds set on development problems, seed 2) and the tiny_cpu corpus's "
            f"held-out documents (thresholds on the first half, scored on the second). Tokens/s: seed "
            f"{results['seeds'][0]}, batch 1, greedy, after a test question; the median of "
            f"{len(results['speed']['every']['tokens_per_s_runs'])} rounds that time every arm in turn, and a "
            f"speed-up is the median of the per-round ratios. Per share: "
            + "; ".join(parts) + f". Whole study: {results['wall_s'] / 60:.1f} min on this machine "
            f"(`{results['command']}`).")


def report(results: dict) -> str:
    return f"{toy_table(results)}\n\n{corpus_table(results)}\n\n{caption(results)}"


# ----------------------------------------------------------------------------------- plot


def _series(summary: dict, kind: str, key: str) -> tuple[list, list, list]:
    """(share, mean, std) of one selection from the control (share 0) to every position (1)."""
    arms = ["control", *_by_share(summary, kind), "every"]
    x = [summary[a]["thinking_share"]["mean"] for a in arms]
    return x, [summary[a][key]["mean"] for a in arms], [summary[a][key]["std"] for a in arms]


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    toy, corpus, speeds = results["summary"]["toy"], results["summary"]["corpus"], results["speed"]
    for ax, summary, key, label in ((axes[0], toy, "accuracy", "toy: held-out answer accuracy"),
                                    (axes[2], corpus, "nll", "tiny_cpu: held-out NLL per token (nats)")):
        for kind, color, legend in (("gate", "tab:blue", "gate (gated training and inference)"),
                                    ("random", "tab:orange", "random selection"),
                                    ("every_gated", "tab:green", "every-position training, gate at inference")):
            ax.errorbar(*_series(summary, kind, key), color=color, marker="o", capsize=3, label=legend,
                        linestyle="--" if kind == "every_gated" else "-")
        ax.axhline(summary["control"][key]["mean"], color="gray", linestyle=":", label="control (no thoughts)")
        ax.set(xlabel="share of positions that think (held-out text)", ylabel=label)
        ax.legend(fontsize=8)
    for color, arm in zip(plt.cm.tab10.colors, _arms(speeds)):
        acc = toy[arm]["accuracy"]
        axes[1].errorbar(speeds[arm]["tokens_per_s"], acc["mean"], yerr=acc["std"], marker="o", capsize=3,
                         color=color, label=f"{arm} ({speeds[arm]['thoughts_per_token']:.2f} thoughts/token)")
    axes[1].legend(fontsize=7)
    axes[1].set(xlabel=f"decoding tokens/s (seed {results['seeds'][0]}, batch 1)", ylabel="toy: answer accuracy",
                xscale="log")
    save_figure(fig, f"Think gate: accuracy and NLL against thinking share and speed, mean ± std over seeds "
                f"{results['seeds']}", path)
