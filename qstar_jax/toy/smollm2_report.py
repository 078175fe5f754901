"""The SmolLM2 math study's report (qstar_jax/toy/smollm2_study.py): the summary over seeds,
the paired differences between arms, the table and the plot, each from the results alone
(WORKDIR/results.json), so a committed results file renders the same table again."""

from __future__ import annotations

import numpy as np

from qstar_jax.toy.runs import marker_pair, save_figure
from qstar_jax.toy.study import summarise

MARKERS = marker_pair("smollm2-study-table")
ARMS = ("lm_control", "policy_off", "quiet_star")
ARM_LABELS = {"base": "base model, untouched", "lm_control": "LM control (next-token training)",
              "policy_off": "Quiet-STaR, policy loss off", "quiet_star": "Quiet-STaR"}
ANSWER_METRICS = ("answer_nll", "answer_digit_nll")
SCALARS = (*ANSWER_METRICS, "answer_nll_no_think", "answer_digit_nll_no_think")
DECILE_CURVES = ("thought_gain", "gain_over_base")
# (first arm, second arm): the first minus the second, seed by seed (same data order per seed)
PAIRS = (("quiet_star", "lm_control"), ("quiet_star", "policy_off"), ("policy_off", "lm_control"))


def aggregate(results: dict) -> dict:
    """Per arm over seeds (mean, sample std, values): the scalar scores and, per decile, the
    mean gain of each decile curve; the untouched base is one model, so one value."""
    summary = {"base": {k: summarise([results["base"][k]]) for k in ANSWER_METRICS}}
    for arm in ARMS:
        scores = [run["scores"] for run in results["runs"] if run["arm"] == arm]
        if not scores:
            continue
        summary[arm] = {k: summarise([s[k] for s in scores]) for k in SCALARS if k in scores[0]}
        for curve in DECILE_CURVES:
            if curve in scores[0]:
                summary[arm][curve] = [summarise([s[curve][d]["mean_gain"] for s in scores]) for d in range(10)]
    return summary


def differences(results: dict) -> dict:
    """Each pair's answer NLLs, first arm minus second, per seed both ran, summarised:
    negative means the first arm predicts the held-out answers better."""
    scores = {(run["arm"], run["seed"]): run["scores"] for run in results["runs"]}
    out = {}
    for first, second in PAIRS:
        seeds = [s for s in results["seeds"] if (first, s) in scores and (second, s) in scores]
        if seeds:
            out[f"{first} - {second}"] = {k: summarise([scores[first, s][k] - scores[second, s][k] for s in seeds])
                                          for k in ANSWER_METRICS}
    return out


def _spread(metric: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{metric['mean']:{sign}.4f}" + (f" ± {metric['std']:.4f}" if len(metric["values"]) > 1 else "")


def _arm_row(arm: str, entry: dict) -> str:
    answer, digits = _spread(entry["answer_nll"]), _spread(entry["answer_digit_nll"])
    own = (f"{_spread(entry['answer_nll_no_think'])} / {_spread(entry['answer_digit_nll_no_think'])}"
           if "answer_nll_no_think" in entry else "–")
    hardest = [_spread(entry[c][-1], signed=True) if c in entry else "–" for c in DECILE_CURVES]
    return f"| {ARM_LABELS[arm]} | {answer} | {digits} | {own} | {hardest[0]} | {hardest[1]} |"


def table(results: dict) -> str:
    """The arms' held-out scores (mean ± std over seeds) and the paired differences."""
    summary, seeds = results["summary"], len(results["seeds"])
    lines = [f"| arm | answer NLL, nats/token (mean ± std, {seeds} seeds) | answer digits NLL | "
             "without its thought: answer / digits | thought gain, hardest decile | gain over base, hardest decile |",
             "|---|---|---|---|---|---|"]
    lines += [_arm_row(arm, summary[arm]) for arm in ("base", *ARMS) if arm in summary]
    lines += ["", "| difference, seed by seed (negative: the first arm is better) | answer NLL | answer digits NLL |",
              "|---|---|---|"]
    for pair, diff in results["differences"].items():
        first, second = pair.split(" - ")
        lines.append(f"| {ARM_LABELS[first]} − {ARM_LABELS[second]} | {_spread(diff['answer_nll'], True)} "
                     f"| {_spread(diff['answer_digit_nll'], True)} |")
    return "\n".join(lines)


def caption(results: dict) -> str:
    """What the numbers are about: data, shapes and optimizer (read from a Quiet-STaR run's
    checkpoint), and how long the study took."""
    run = next(r for r in results["runs"] if r["arm"] == "quiet_star")
    settings, qs = run["settings"], run["settings"]["quiet_star"]
    return (f"{results['model']}: {results['test_problems']} held-out GSM-style problems (split \"test\", seed "
            f"{results['test_seed']}; {results['held_out_tokens']} held-out tokens), {results['train_documents']} "
            f"training documents (split \"train\"); per arm {run['steps']} steps of {settings['batch_size']} x "
            f"{settings['data']['seq_len']} tokens, lr {settings['optimizer']['learning_rate']:g}; thinking arms "
            f"n_ahead {qs['n_ahead']}, n_ahead_talk {qs['n_ahead_talk']}, n_passes {qs['n_passes']}, Quiet-STaR's "
            f"policy weight {qs['policy_loss_weight']:g}. Scores: one thought before every token, judged on it "
            f"(thinking arms); gains in nats of log-prob, deciles of the model's own NLL (thought gain) or of the "
            f"base model's (gain over base). Seeds {', '.join(map(str, results['seeds']))}; whole study "
            f"{results['wall_s'] / 60:.1f} min (`{results['command']}`).")


def text(results: dict) -> str:
    return f"{table(results)}\n\n{caption(results)}"


def plot(results: dict, path: str) -> None:
    """Answer NLLs per arm, the hard-token gain of the thought by decile of the model's own
    NLL, and every arm's gain over the base model by decile of the base model's NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    arms = [arm for arm in ("base", *ARMS) if arm in summary]
    for offset, (metric, label) in zip((-0.2, 0.2), zip(ANSWER_METRICS, ("all answer tokens", "digit tokens"))):
        means = [summary[arm][metric]["mean"] for arm in arms]
        stds = [summary[arm][metric]["std"] for arm in arms]
        axes[0].bar(np.arange(len(arms)) + offset, means, 0.4, yerr=stds, capsize=3, label=label)
    axes[0].set_xticks(range(len(arms)), [ARM_LABELS[arm].replace(" (", "\n(").replace(", ", ",\n") for arm in arms],
                       fontsize=7)
    axes[0].set(ylabel="held-out answer NLL (nats/token)")
    axes[0].legend(fontsize=7)
    deciles = np.arange(1, 11)
    for ax, curve in zip(axes[1:], DECILE_CURVES):
        for color, arm in zip(plt.cm.tab10.colors, ARMS):
            if curve in summary.get(arm, {}):
                mean = np.array([d["mean"] for d in summary[arm][curve]])
                std = np.array([d["std"] for d in summary[arm][curve]])
                ax.plot(deciles, mean, marker="o", color=color, label=ARM_LABELS[arm])
                ax.fill_between(deciles, mean - std, mean + std, color=color, alpha=0.2)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(deciles)
        ax.legend(fontsize=7)
    axes[1].set(xlabel="decile of the model's own NLL (10 = hardest)", ylabel="gain of the thought (nats)")
    axes[2].set(xlabel="decile of the base model's NLL (10 = hardest)", ylabel="gain over the base model (nats)")
    save_figure(fig, f"{results['model']} on held-out GSM-style problems: mean ± std over seeds {results['seeds']}",
                path)
