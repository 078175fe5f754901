"""What the toy studies share: a fresh workdir, a training run as a subprocess, the base
model's export, their arguments and main, and publishing results: a results file committed
under docs/results/, the tables written from it into the docs, and a plot."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, NamedTuple

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.models import model_files
from qstar_jax.training import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # qstar_jax/toy/ -> the repo


def make_workdir(path: str) -> None:
    """A study's --workdir, created if needed; a path that cannot be one is a one-line error."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--workdir {path}: not a directory (a file is in the way)") from None
    except PermissionError as e:
        raise UserError(f"--workdir {path}: cannot create it ({e.strerror})") from None


def train(config: str, workdir: str, overrides: list[str], cache_dir: str) -> float:
    """One `qstar_jax.train` run (resumes if already started); returns its wall seconds."""
    os.makedirs(workdir, exist_ok=True)
    args = [sys.executable, "-m", "qstar_jax.train", "--config", config, "--workdir", workdir,
            f"--config.compilation_cache_dir={cache_dir}", *overrides]
    start = time.perf_counter()
    with open(os.path.join(workdir, "train.log"), "a") as log:
        result = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise UserError(f"training run failed (exit {result.returncode}); see {workdir}/train.log")
    return time.perf_counter() - start


def training_documents(config_file: str, overrides: list[str]) -> list[str]:
    """Every document `qstar_jax.train --config CONFIG_FILE OVERRIDES` reads, its own eval
    documents included: the config parsed as the training command parses it, so a study's
    held-out check sees exactly the text each of its runs trains on."""
    from absl import flags
    from ml_collections import config_flags

    from qstar_jax.training.data import load_documents

    if REPO not in sys.path:  # the configs import experiments.base, as the runs (started in REPO) do
        sys.path.append(REPO)
    argv = ["qstar_jax.train", f"--config={config_file}", *overrides]
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    documents = load_documents(config.value.data)
    return [documents[i] for i in range(len(documents))]


def export_base(run_dir: str, model_dir: str) -> None:
    """The base run's final checkpoint as a model directory (what init_from reads)."""
    if model_files.is_model_dir(model_dir):
        return
    config, _, params, tokenizer = checkpoint.load_for_inference(run_dir)
    model_files.save_model(model_dir, config, params, tokenizer)


def int_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers (`0,1,2`)."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class Home(NamedTuple):
    """Where a study's results are committed and which docs show the table rendered from them
    (paths relative to the repo)."""

    results: str
    docs: tuple[str, ...]


STUDY_DOCS = ("README.md", "docs/results.md")  # README.md until it links to docs/results.md instead
STUDY_HOMES = {  # by marker name; qstar_jax/toy/results_tables.py pairs each with its renderer
    "toy-study-table": Home("docs/results/toy_study.json", STUDY_DOCS),
    "toy-study-aside-table": Home("docs/results/toy_study_aside.json", STUDY_DOCS),
    "gate-study-table": Home("docs/results/gate_study.json", STUDY_DOCS),
    "toy-ntp-table": Home("docs/results/toy_ntp_study.json", STUDY_DOCS),
    "smollm2-study-table": Home("docs/results/smollm2_study.json", ("docs/results.md",)),
}
README_HINT = " (pass --readme '' for none)"


def marker_pair(name: str) -> tuple[str, str]:
    """The start and end markers of the table called `name` in a doc."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def study_home(markers: tuple[str, str]) -> Home:
    """The committed home of the study whose table lies between `markers`."""
    name = markers[0].removeprefix("<!-- ").removesuffix(":start -->")
    if name not in STUDY_HOMES or marker_pair(name) != markers:
        raise UserError(f"no committed results file is registered for the {markers[0]} table (STUDY_HOMES in "
                        f"qstar_jax/toy/runs.py); pass --readme FILE to write the table there only")
    return STUDY_HOMES[name]


def read_readme(path: str, markers: tuple[str, str], hint: str = README_HINT) -> str:
    """The doc's text, checked for a table's markers (a study checks before an hour of training)."""
    start, end = markers
    try:
        with open(path) as f:
            readme = f.read()
    except FileNotFoundError:
        raise UserError(f"doc to update not found: {path}{hint}") from None
    if start not in readme or end not in readme:
        raise UserError(f"{path} has no {start} ... {end} markers to put the table between{hint}")
    return readme


def marked_text(path: str, markers: tuple[str, str], hint: str = README_HINT) -> str:
    """What lies between a table's markers in `path`, without the newlines `update_readme` adds."""
    start, end = markers
    return read_readme(path, markers, hint).split(start, 1)[1].split(end, 1)[0].strip("\n")


def update_readme(path: str, text: str, markers: tuple[str, str]) -> None:
    """Replaces what lies between a study's markers in `path` with `text`."""
    start, end = markers
    head, rest = read_readme(path, markers).split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


def write_json(path: str, value: dict) -> None:
    """A results file, its folder created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")


def load_json(path: str, what: str = "results file") -> dict:
    """A results file; a missing or unreadable one is a one-line error."""
    try:
        return json.loads(paths.read_text(path, what))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None


def linked(text: str, results: str, doc: str) -> str:
    """A table as a doc shows it: followed by a link to the committed results it was written
    from, so a reader can check its numbers against the data."""
    link = os.path.relpath(results, os.path.dirname(doc) or ".")
    return f"{text}\n\nData: [`{results}`]({link})"


def publish_home(results: dict, home: Home, markers: tuple[str, str], render: Callable[[dict], str],
                 root: str = REPO) -> None:
    """Commits `results` to the home's file under `root` and writes the table into each of its
    docs rendered from that file, read back (JSON turns keys into strings, tuples into
    lists): what `python -m qstar_jax.toy.results_tables --check` renders."""
    write_json(os.path.join(root, home.results), results)
    committed = load_json(os.path.join(root, home.results))
    for doc in home.docs:
        update_readme(os.path.join(root, doc), linked(render(committed), home.results, doc), markers)


def publish(results: dict, workdir: str, render: Callable[[dict], str], readme: str, markers: tuple[str, str],
            draw: Callable[[dict, str], None], plot_path: str, home: Home | None = None, root: str = REPO) -> None:
    """A study's outputs: WORKDIR/results.json, the table printed and written either into its
    `home` (the committed results file and every doc that shows the table) or between the
    markers of `readme` (unless ''), and `draw(results, plot_path)` (unless it is '')."""
    write_json(os.path.join(workdir, "results.json"), results)
    print(render(results))
    if home is not None:
        publish_home(results, home, markers, render, root)
    elif readme:
        update_readme(readme, render(results), markers)
    if plot_path:
        draw(results, plot_path)
        print(f"plot: {plot_path}")


def study_parser(module: str, description: str, workdir: str, seeds_help: str, table: str,
                 plot_default: str | None, plot_help: str | None = None) -> argparse.ArgumentParser:
    """The arguments every study takes: --workdir, --seeds, --readme (whose `table` to
    replace), --plot and --smoke; a study adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2], help=f"comma-separated seeds of {seeds_help}")
    parser.add_argument("--readme", help=f"file whose {table} to replace ('' = none; default: the study's committed "
                        "results file under docs/results/ and every doc that shows its table)")
    parser.add_argument("--plot", default=plot_default, help=plot_help)
    parser.add_argument("--smoke", action="store_true", help="a miniature for the tests (its numbers mean nothing)")
    return parser


def save_figure(fig, title: str, path: str) -> None:
    """A study's plot: titled, laid out and written to `path` (its folder created)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def destinations(args: argparse.Namespace, markers: tuple[str, str]) -> tuple[str, Home | None]:
    """(readme, home) of a study's table: --readme FILE (or '', nowhere) as given; by default
    its committed home, except for a --smoke miniature, whose numbers mean nothing."""
    if args.readme is not None:
        return args.readme, None
    return "", None if args.smoke else study_home(markers)


def run_study(prog: str, argv: list[str], args: argparse.Namespace, markers: tuple[str, str],
              study: Callable[[], dict], report: Callable[[dict], str], draw: Callable[[dict, str], None]) -> None:
    """A study's `main` once its arguments are parsed: the docs' markers are checked before
    any training, the study runs, and its results (with the command that made them) are
    published to args.workdir, its home or args.readme, and args.plot."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax warns about every checkpoint it reads
    readme, home = destinations(args, markers)
    docs = [os.path.join(REPO, doc) for doc in home.docs] if home else [doc for doc in [readme] if doc]
    for doc in docs:
        read_readme(doc, markers)
    results = study()
    results["command"] = " ".join([f"python -m {prog}", *argv])
    publish(results, args.workdir, report, readme, markers, draw, args.plot, home, REPO)
