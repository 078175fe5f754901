"""Our train step against the official PyTorch step, measured alternately in one run; prints JSON.

Machines differ several-fold in speed, so a figure recorded elsewhere says nothing: this
runs the official step and ours at the same shape in alternation (official, ours, plain
in even pairs, the reverse in odd ones, each in a fresh process), measures this machine's f32
matmul peak before and after, and prints the ratio of the medians, the per-pair ratios,
our model FLOP/s as a share of that peak (MFU), and each side's peak memory.

Each pair also times a ceiling: a plain next-token train step of the same model (XLA,
same per-layer remat) over as many token passes as one Quiet-STaR step (`plain_batch`
rows). `ceiling_speedup` is the official step's time over ours run at that plain step's
FLOP rate, the ratio our step would reach if the thoughts cost no more per FLOP than
ordinary training; `ours_over_plain_rate` is our FLOP rate as a share of the plain one.

    python benchmarks/side_by_side.py --official-python VENV/bin/python \
        [--shape tiny|smollm2] [--set seq=128 ...] [--ours rollout_impl=two_pass --ours remat=1]
        [--pairs 2] [--steps 3]

Shapes: `tiny` is the official code's own tiny config (a random Mistral, hidden 64, 2
layers, 4 heads / 2 KV, MLP 256, vocab 1000; batch 4 x 256, n_ahead 12, n_ahead_talk 4,
n_passes 2); `smollm2` is a real model's width (the SmolLM2-135M shape: hidden 576, 30
layers, 9 heads / 3 KV, MLP 1536, vocab 49152; batch 2 x 64, n_ahead 8, n_ahead_talk 4).
Both sides run float32 on the CPU with random weights and tokens.

The official side needs a venv of its own (the official code is not part of this
repository): torch 2.13.0 and transformers 4.37.2, with `modeling_mistral.py` and
`configuration_mistral.py` from a git copy of ezelikman/quiet-star written over that
transformers' `models/mistral/`:

    python3 -m venv VENV && VENV/bin/pip install torch==2.13.0 transformers==4.37.2 \
        pandas seaborn matplotlib wandb termcolor tqdm reportlab   # what the official file imports
    D=$(VENV/bin/python -c "import transformers, os; print(os.path.dirname(transformers.__file__))")/models/mistral
    for f in modeling_mistral.py configuration_mistral.py; do git -C QUIET_STAR show HEAD:$f > $D/$f; done

The official process runs under an address-space limit (`--official-memory-gb`), so a
shape it cannot fit ends as "out of memory" instead of inviting the kernel's OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    "tiny": dict(hidden=64, inter=256, layers=2, heads=4, kv=2, vocab=1000, batch=4, seq=256,
                 n_ahead=12, n_ahead_talk=4, n_passes=2),
    "smollm2": dict(hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152, batch=2, seq=64,
                    n_ahead=8, n_ahead_talk=4, n_passes=2),
}
MATMUL_SIZES = (512, 1024, 2048)


def parse_settings(pairs: list[str]) -> dict[str, int]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in SHAPES["tiny"]:
            raise SystemExit(f"--set takes KEY=INT with KEY one of {', '.join(SHAPES['tiny'])}; got {pair!r}")
        try:
            settings[key] = int(value)
        except ValueError:
            raise SystemExit(f"--set {key}: not an integer: {value!r}") from None
    return settings


OURS_SETTINGS = {"rollout_impl": ("scan", "two_pass"), "remat": ("0", "1")}


def parse_ours(pairs: list[str]) -> dict[str, str]:
    """--ours KEY=VALUE: how our step runs (its defaults otherwise): the rollout algorithm
    and per-layer rematerialisation, the two choices that trade memory for speed."""
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if value not in OURS_SETTINGS.get(key, ()):
            choices = "; ".join(f"{k}={'|'.join(v)}" for k, v in OURS_SETTINGS.items())
            raise SystemExit(f"--ours takes one of {choices}; got {pair!r}")
        settings[key] = value
    return settings


def official_args(shape: dict, steps: int) -> list[str]:
    names = dict(hidden="hidden", layers="layers", heads="heads", kv="kv", inter="inter", vocab="vocab",
                 batch="batch", seq="seq", n_ahead="n-ahead", n_ahead_talk="talk", n_passes="passes")
    return [arg for key, flag in names.items() for arg in (f"--{flag}", str(shape[key]))] + ["--steps", str(steps)]


def last_json_line(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    stderr = result.stderr.strip().splitlines()
    memory = any("can't allocate memory" in line or "MemoryError" in line for line in stderr)
    reason = "out of memory" if memory or result.returncode == -9 else (stderr or ["no output"])[-1][:300]
    return {"error": f"{reason} (exit {result.returncode})"}


def run_official(python: str, shape: dict, steps: int, memory_gb: float) -> dict:
    def limit_memory() -> None:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [python, os.path.join(REPO, "benchmarks", "official_step.py"), *official_args(shape, steps)]
    return last_json_line(subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_memory))


def run_ours(shape: dict, ours: dict[str, str], steps: int, plain: bool = False) -> dict:
    """Our Quiet-STaR step, or with `plain` the plain next-token step of the same model over
    as many token passes (the ceiling: `plain_batch`), with the same per-layer remat."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    settings = {"rollout_impl": ours.get("rollout_impl", "scan"), "remat": ours.get("remat") == "1"}
    if plain:
        settings.update(objective="next_token", batch=plain_batch(shape))
    spec = json.dumps({**shape, **settings, "variant": "parallel"})
    command = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--child", spec, "--steps", str(steps)]
    return last_json_line(subprocess.run(command, capture_output=True, text=True, env=env))


def matmul_peak() -> dict[str, float]:
    """GFLOP/s of the best f32 square matmul of each size, on this machine, now. Measured in
    a child process: this one forks the official step, and forking a process whose JAX
    runtime has started its threads can deadlock."""
    code = ("import json; from qstar_jax.training.flops import measured_matmul_peak as m; "
            f"print(json.dumps({{s: round(m(s) / 1e9, 1) for s in {MATMUL_SIZES!r}}}))")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return {str(size): gflops for size, gflops in json.loads(result.stdout).items()}


def configs(shape: dict):
    """(ModelConfig, QuietStarConfig) of a shape, as both child processes build them."""
    from qstar_jax.models.config import ModelConfig
    from qstar_jax.method.config import QuietStarConfig

    model = ModelConfig("mistral", shape["vocab"], shape["hidden"], shape["inter"], shape["layers"], shape["heads"],
                        shape["kv"], shape["hidden"] // shape["heads"], sliding_window=4096)
    qs = QuietStarConfig(n_ahead=shape["n_ahead"], n_ahead_talk=shape["n_ahead_talk"], n_passes=shape["n_passes"],
                         start_token_id=shape["vocab"] - 2, end_token_id=shape["vocab"] - 1)
    return model, qs


def plain_batch(shape: dict) -> int:
    """Rows of the plain LM step that passes as many tokens through the layers as one
    Quiet-STaR step: the text once plus every step of every thought (n_passes x n_steps)."""
    _, qs = configs(shape)
    return shape["batch"] * (1 + qs.n_passes * qs.n_steps)


def model_flops(shape: dict) -> float:
    """Model FLOPs of our step (forward + backward, what MFU counts; remat and the
    two-pass sampling scan are extra work, not extra model FLOPs)."""
    from qstar_jax.training.flops import step_flops

    model, qs = configs(shape)
    return step_flops(model, qs, shape["batch"], shape["seq"])["model_flops_per_step"]


def plain_flops(shape: dict) -> float:
    from qstar_jax.training.flops import lm_step_flops

    return lm_step_flops(configs(shape)[0], plain_batch(shape), shape["seq"])


def summarise(shape: dict, settings: dict[str, str], pairs: list[dict], peaks: list[dict[str, float]]) -> dict:
    """Medians of each side, the ratio of the medians and per pair, and our MFU against the
    best matmul rate measured in this run."""
    def median_of(side: str) -> float | None:
        times = [pair[side]["step_s"] for pair in pairs if "step_s" in pair[side]]
        return statistics.median(times) if times else None

    def peak_of(side: str, key: str) -> float | None:
        values = [pair[side][key] for pair in pairs if key in pair[side]]
        return max(values) if values else None

    official, ours, plain = median_of("official"), median_of("ours"), median_of("plain")
    peak_gflops = max(value for peak in peaks for value in peak.values())
    flops, flops_plain = model_flops(shape), plain_flops(shape)
    # Our step at the plain LM step's FLOP rate: what XLA reaches on this model here.
    ceiling_s = plain * flops / flops_plain if plain else None
    return {
        "shape": shape,
        "ours": settings,
        "pairs": pairs,
        "matmul_peak_gflops": peaks,
        "official_step_s": official,
        "ours_step_s": ours,
        "speedup": round(official / ours, 3) if official and ours else None,
        "speedup_per_pair": [round(p["official"]["step_s"] / p["ours"]["step_s"], 3) for p in pairs
                             if "step_s" in p["official"] and "step_s" in p["ours"]],
        "model_gflops_per_step": round(flops / 1e9, 3),
        "ours_gflops_per_s": round(flops / ours / 1e9, 1) if ours else None,
        "ours_mfu": round(flops / ours / (peak_gflops * 1e9), 4) if ours else None,
        "plain_lm": {
            "batch": plain_batch(shape),
            "step_s": plain,
            "model_gflops_per_step": round(flops_plain / 1e9, 3),
            "mfu": round(flops_plain / plain / (peak_gflops * 1e9), 4) if plain else None,
        },
        "ceiling_speedup": round(official / ceiling_s, 3) if official and ceiling_s else None,
        "ours_over_plain_rate": round(ceiling_s / ours, 3) if ceiling_s and ours else None,
        "official_peak_rss_gb": peak_of("official", "peak_rss_gb"),
        "ours_peak_rss_gb": peak_of("ours", "peak_rss_gb"),
        "official_errors": sorted({p["official"]["error"] for p in pairs if "error" in p["official"]}),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-python", required=True, help="python of the venv with the official model code")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT", help="override one shape setting")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="rollout_impl=scan|two_pass, remat=0|1 (default: our defaults, scan and 0)")
    parser.add_argument("--pairs", type=int, default=2, help="alternating (official, ours) measurements")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement, after one warm-up")
    parser.add_argument("--official-memory-gb", type=float, default=20.0)
    args = parser.parse_args(argv)
    if not os.access(args.official_python, os.X_OK):
        raise SystemExit(f"--official-python {args.official_python}: not an executable")
    if args.pairs < 1 or args.steps < 1:
        raise SystemExit("--pairs and --steps must be >= 1")
    shape, ours = {**SHAPES[args.shape], **parse_settings(args.set)}, parse_ours(args.ours)
    peaks, pairs = [matmul_peak()], []
    for index in range(args.pairs):
        order = ("official", "ours", "plain") if index % 2 == 0 else ("plain", "ours", "official")
        pair = {"order": list(order)}
        for side in order:
            pair[side] = (run_official(args.official_python, shape, args.steps, args.official_memory_gb)
                          if side == "official" else run_ours(shape, ours, args.steps, plain=side == "plain"))
            print(json.dumps({"pair": index, "side": side, **pair[side]}), file=sys.stderr, flush=True)
        pairs.append(pair)
    peaks.append(matmul_peak())
    print(json.dumps(summarise(shape, ours, pairs, peaks)), flush=True)


if __name__ == "__main__":
    main()
