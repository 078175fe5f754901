"""What the toy studies share: a fresh workdir, a training run as a subprocess, the base
model's export, their arguments and main, and publishing results to the README and a plot."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

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


def read_readme(path: str, markers: tuple[str, str]) -> str:
    """The README text, checked for a study's table markers (before an hour of training)."""
    start, end = markers
    try:
        with open(path) as f:
            readme = f.read()
    except FileNotFoundError:
        raise UserError(f"README to update not found: {path} (pass --readme '' for none)") from None
    if start not in readme or end not in readme:
        raise UserError(f"{path} has no {start} ... {end} markers to put the table between (pass --readme '' for none)")
    return readme


def update_readme(path: str, text: str, markers: tuple[str, str]) -> None:
    """Replaces what lies between a study's markers in `path` with `text`."""
    start, end = markers
    head, rest = read_readme(path, markers).split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


def publish(results: dict, workdir: str, text: str, readme: str, markers: tuple[str, str],
            draw: Callable[[dict, str], None], plot_path: str) -> None:
    """A study's outputs: WORKDIR/results.json, the table printed and put between the README's
    markers (unless `readme` is ''), and `draw(results, plot_path)` (unless it is '')."""
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(text)
    if readme:
        update_readme(readme, text, markers)
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
    parser.add_argument("--readme", default="README.md", help=f"file whose {table} to replace ('' = none)")
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


def run_study(prog: str, argv: list[str], args: argparse.Namespace, markers: tuple[str, str],
              study: Callable[[], dict], report: Callable[[dict], str], draw: Callable[[dict, str], None]) -> None:
    """A study's `main` once its arguments are parsed: the README's markers are checked
    before any training, the study runs, and its results (with the command that made them)
    are published to args.workdir, args.readme and args.plot."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax warns about every checkpoint it reads
    if args.readme:
        read_readme(args.readme, markers)
    results = study()
    results["command"] = " ".join([f"python -m {prog}", *argv])
    publish(results, args.workdir, report(results), args.readme, markers, draw, args.plot)
