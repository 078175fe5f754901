"""Gated training's step time against thinking at every position, timed alternately in one
process at the train-step benchmark's anchor shape; prints one JSON object.

Both steps carry a linear think gate; the gated one thinks at `--share` of each row's
positions (quiet_star.think_share, docs/method.md "Think gate"). Rounds alternate the two
steps so that a change in the machine's load falls on both alike; the medians and their
ratio are reported (issue 17's bar: at most 0.40 at share 0.25).

    python benchmarks/gated_step.py [--share 0.25] [--rounds 7] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import ANCHOR, build, timed_step  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.25, help="think_share of the gated step, in (0, 1)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each times both steps once)")
    parser.add_argument("--seq", type=int, default=ANCHOR["seq"], help="sequence length (the anchor's by default)")
    args = parser.parse_args(argv)
    if not 0.0 < args.share < 1.0 or args.rounds < 1 or args.seq < 2:
        parser.error("--share must be in (0, 1), --rounds >= 1 and --seq >= 2")
    specs = {"every": dict(ANCHOR, seq=args.seq, variant="parallel", think_gate="linear"),
             "gated": dict(ANCHOR, seq=args.seq, variant="parallel", think_gate="linear", think_share=args.share)}
    runs = {}
    for name, spec in specs.items():
        step, state, tokens, valid = build(spec)
        _, state, _ = timed_step(step, state, tokens, valid)  # compiles
        runs[name] = [step, state, tokens, valid]
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds, run[1], _ = timed_step(*run)
            times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({"shape": specs["every"], "share": args.share, "rounds": args.rounds,
                      "step_s": {name: round(m, 4) for name, m in median.items()},
                      "times": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
                      "gated_over_every": round(median["gated"] / median["every"], 4)}))


if __name__ == "__main__":
    main()
