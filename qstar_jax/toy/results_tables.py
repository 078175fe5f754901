"""Every generated table of README.md and docs/: written by code from a results file committed
beside it (docs/results/NAME.json), so a reader can check the numbers against the data.

    python -m qstar_jax.toy.results_tables [--check] [RESULTS ...]
    python -m qstar_jax.toy.results_tables --tiny-cpu RUN_DIR ANALYZE_DIR
    python -m qstar_jax.toy.results_tables --fast-chain WORKDIR

The first rewrites every table whose results file is committed (or only those fed by the
RESULTS files named), from that file; with --check it rewrites nothing and exits 2 naming
the first table that differs from what its file renders. A study's default command commits
its file and writes its tables itself (toy/runs.py `publish`); --tiny-cpu commits the
tiny_cpu run's final metrics and `python -m qstar_jax.analyze`'s summary, --fast-chain the
Fast Quiet-STaR chain's chain_summary.json, and each then writes its tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, NamedTuple

from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.toy import gate_report, ntp_study, smollm2_report, study
from qstar_jax.toy.runs import REPO, STUDY_HOMES, linked, load_json, marked_text, marker_pair, update_readme, write_json
from qstar_jax.training.curriculum import SUMMARY_FILE
from qstar_jax.training.metrics import METRICS_FILE, logged_lines

TINY_CPU = "docs/results/tiny_cpu.json"
FAST_CHAIN = "docs/results/fast_quiet_star_tiny.json"
TINY_CPU_EVAL = ("eval/nll_base", "eval/nll_talk", "eval/mixing_weight")  # what its table reads


class Table(NamedTuple):
    """One generated table: the doc and marker name it lies between, the committed results
    file (paths relative to the repo) and the pure function that renders it from that file."""

    doc: str
    marker: str
    results: str
    render: Callable[[dict], str]

    @property
    def markers(self) -> tuple[str, str]:
        return marker_pair(self.marker)


# -------------------------------------------------------------------------------- tiny_cpu


def tiny_cpu_results(run_dir: str, analyze_dir: str) -> dict:
    """The tiny_cpu results file: the run's last logged training line and last evaluation
    (metrics.jsonl) and `python -m qstar_jax.analyze --output ANALYZE_DIR`'s summary."""
    lines = [json.loads(line) for _, line in logged_lines(os.path.join(run_dir, METRICS_FILE))]
    training = [line for line in lines if not any(key.startswith("eval/") for key in line)]
    evaluations = [line for line in lines if all(key in line for key in TINY_CPU_EVAL)]
    if not training:
        raise UserError(f"{os.path.join(run_dir, METRICS_FILE)}: no training step logged; is {run_dir} a training "
                        "workdir?")
    if not evaluations:
        raise UserError(f"{os.path.join(run_dir, METRICS_FILE)}: no evaluation logs {', '.join(TINY_CPU_EVAL)}; "
                        "is it a Quiet-STaR run with eval_every set?")
    return {"run": run_dir, "final_train": training[-1], "final_eval": evaluations[-1],
            "analyze": load_json(os.path.join(analyze_dir, "summary.json"), "analyze summary")}


def tiny_cpu_table(results: dict) -> str:
    train, evaluation, analysis = results["final_train"], results["final_eval"], results["analyze"]
    deciles = ", ".join(f"{row['mean_gain']:.2f}" for row in analysis["deciles"])
    return "\n".join([
        "| steps | tokens/s (last logged step) | held-out NLL, base → talk | mixing weight (held out) "
        "| gain of thinking, nats per token | tokens improved |", "|---|---|---|---|---|---|",
        f"| {train['step']} | {train['tokens_per_s']:,.0f} | {evaluation['eval/nll_base']:.3f} → "
        f"{evaluation['eval/nll_talk']:.3f} (step {evaluation['step']}) | {evaluation['eval/mixing_weight']:.2f} "
        f"| {analysis['mean_gain']:.3f} | {analysis['fraction_improved']:.0%} |", "",
        f"Run `{results['run']}`. Gain of thinking: `python -m qstar_jax.analyze` on {analysis['documents']} "
        f"held-out documents ({analysis['tokens']} tokens), the log-probability of each next token after one "
        f"sampled thought minus the base prediction's; mean per decile of base NLL (easiest → hardest): "
        f"{deciles}."])


# ------------------------------------------------------------------------------ fast chain


def _speed(stage: dict) -> str:
    if "tokens_per_s" not in stage:
        return "–"
    runs = stage["tokens_per_s_runs"]
    return f"{stage['tokens_per_s']:,.0f} ({min(runs):,.0f}–{max(runs):,.0f})"


def fast_chain_table(summary: dict) -> str:
    """The Fast Quiet-STaR chain's stages from its chain_summary.json (training/curriculum.py)."""
    metric = summary["metric"]
    lines = [f"| stage | method | n_ahead–talk | steps | picked step | `{metric}` at the pick | `{metric}` at each "
             "evaluation | forward passes / token | tokens/s (range) |", "|---|---|---|---|---|---|---|---|---|"]
    for stage in summary["stages"]:
        steps = sorted(map(int, stage["values"]))
        values = ", ".join(f"{stage['values'][str(step)]:.4f}" for step in steps)
        talk = f"{stage['n_ahead']}–{stage['n_ahead_talk']}" if stage["n_ahead"] else "–"
        passes = f"{stage['forward_passes_per_token']:g}" if "forward_passes_per_token" in stage else "–"
        lines.append(f"| {stage['name']} | {stage['method']} | {talk} | {steps[-1]} | {stage['best_step']} "
                     f"| {stage['value']:.4f} | {values} "
                     f"| {passes} | {_speed(stage)} |")
    timed = [stage for stage in summary["stages"] if "tokens_per_s_runs" in stage]
    speed = (f"Tokens/s: greedy decoding at batch 1 of each pick, all timed one after another at the end of the "
             f"chain; the median of {len(timed[0]['tokens_per_s_runs'])} runs and their range." if timed
             else "Decoding was not timed (`curriculum.bench_tokens` 0).")
    best = "lowest" if summary["mode"] == "min" else "highest"
    return "\n".join(lines) + (f"\n\nPicked step: the stage's checkpoint with the {best} `{metric}`, which the next "
                                f"stage continues from (an NTP stage: learns from, as its teacher). {speed}")


# -------------------------------------------------------------------------------- registry


def _with_caption(table: Callable[[dict], str], caption: Callable[[dict], str]) -> Callable[[dict], str]:
    """A study's report as its `main` prints it: the table, then its caption."""
    return lambda results: f"{table(results)}\n\n{caption(results)}"


STUDY_RENDERERS = {
    "toy-study-table": _with_caption(study.table, study.caption),
    "toy-study-aside-table": _with_caption(study.table, study.caption),
    "gate-study-table": gate_report.report,
    "toy-ntp-table": _with_caption(ntp_study.table, ntp_study.caption),
    "smollm2-study-table": smollm2_report.text,
}
TABLES = (
    *(Table(doc, marker, home.results, STUDY_RENDERERS[marker]) for marker, home in STUDY_HOMES.items()
      for doc in home.docs),
    Table("docs/results.md", "tiny-cpu-table", TINY_CPU, tiny_cpu_table),
    Table("docs/results.md", "fast-chain-table", FAST_CHAIN, fast_chain_table),
)


def rendered(table: Table, root: str = REPO) -> str:
    """The table as its committed results file renders it, with the link to that file."""
    return linked(table.render(load_json(os.path.join(root, table.results))), table.results, table.doc)


def shown(table: Table, root: str = REPO) -> str:
    """What the doc has between the table's markers now."""
    return marked_text(os.path.join(root, table.doc), table.markers, hint="")


def rewrite(tables: tuple[Table, ...], root: str = REPO, check: bool = False, only: tuple[str, ...] = ()) -> list[str]:
    """Writes each table from its results file (`check`: raises at the first that differs
    instead); a table whose file is not committed yet waits, unless `only` names its file.
    Returns what happened to each table, one line each."""
    named = {os.path.normpath(path) for path in only}
    if unknown := sorted(named - {table.results for table in tables}):
        raise UserError(f"no table is written from {unknown[0]}; the registry's files: "
                        f"{', '.join(sorted({table.results for table in tables}))}")
    done = []
    for table in (t for t in tables if not named or t.results in named):
        where, now = f"{table.doc} ({table.marker})", shown(table, root)  # markers checked, file or not
        if table.results not in named and not os.path.exists(os.path.join(root, table.results)):
            done.append(f"waiting for {table.results}: {where}")
            continue
        text = rendered(table, root)
        if now == text.strip("\n"):
            done.append(f"up to date: {where}")
        elif check:
            raise UserError(f"{where} differs from what {table.results} renders; rewrite it with "
                            "`python -m qstar_jax.toy.results_tables`")
        else:
            update_readme(os.path.join(root, table.doc), text, table.markers)
            done.append(f"rewrote: {where}")
    return done


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.toy.results_tables", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", help="only the tables written from these files (repo-relative paths)")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 2 if a table differs from its file")
    parser.add_argument("--tiny-cpu", nargs=2, metavar=("RUN_DIR", "ANALYZE_DIR"),
                        help=f"commit {TINY_CPU} from a tiny_cpu workdir and an analyze --output folder")
    parser.add_argument("--fast-chain", metavar="WORKDIR", help=f"commit {FAST_CHAIN} from WORKDIR/{SUMMARY_FILE}")
    args = parser.parse_args(argv)
    if args.check and (args.tiny_cpu or args.fast_chain):
        raise UserError("--check compares the committed files; it cannot be given with --tiny-cpu or --fast-chain")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None, tables: tuple[Table, ...] = TABLES, root: str = REPO) -> None:
    """`tables` and `root` are the registry and the repo (a test passes its own). --tiny-cpu
    and --fast-chain commit a file, then write the tables fed by it."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    only = list(args.results)
    if args.tiny_cpu:
        write_json(os.path.join(root, TINY_CPU), tiny_cpu_results(*args.tiny_cpu))
        only.append(TINY_CPU)
    if args.fast_chain:
        summary = load_json(os.path.join(args.fast_chain, SUMMARY_FILE), "chain summary")
        write_json(os.path.join(root, FAST_CHAIN), summary)
        only.append(FAST_CHAIN)
    for line in rewrite(tables, root, args.check, tuple(only)):
        print(line)


if __name__ == "__main__":
    main()
