"""The 7B plan in docs/scaling.md, from the real TPU compiler (libtpu) on a machine with no TPU.

    python benchmarks/tpu_plan.py [--results docs/tpu_plan.json] [--doc docs/scaling.md] [--fresh]

For each 7B config and slice: mesh.auto's pick for the configured step (scan rollout, layer
remat; the lowest per-chip peak that fits HBM with 10% free), then at that mesh the two_pass
rollout and both without `model.remat`; where no mesh divides the paper's batch, why, and
the step at the batch that would. Then thinking generation of each model on one host. Every
finished compile is added to the results file at once, so an interrupted run goes on where
it stopped (--fresh starts over); the doc's tables are rewritten from that file alone
(`--tables-only` does only that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPUs; never probe for one here
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qstar_jax.errors import UserError  # noqa: E402
from qstar_jax.inference.preflight import decode_preflight  # noqa: E402
from qstar_jax.models import chips, sharding  # noqa: E402
from qstar_jax.toy.runs import update_readme  # noqa: E402
from qstar_jax.training.preflight import choose_mesh, compile_train_step, configured_shapes, step_report  # noqa: E402
from qstar_jax.training.setup import optimizer_config  # noqa: E402
from qstar_jax.training.step import make_optimizer  # noqa: E402
from step_flops import load_experiment  # noqa: E402

CONFIGS = ("mistral_owm", "qwen2_5_7b_owm")
SLICES = ("v4-32", "v5litepod-64", "v5p-32", "v6e-16")  # every slice docs/scaling.md and the README name
HOSTS = ("v5litepod-8", "v4-8")  # one host each: where `generate` and `evaluate` run
VARIANTS = (("scan", True), ("two_pass", True), ("scan", False), ("two_pass", False))  # (rollout, model.remat)
DECODE = dict(batch=8, prompt_len=512, new_tokens=64)  # evaluate's batches: prompt + answer, thinking
MARKERS = {"train": ("<!-- tpu-plan:start -->", "<!-- tpu-plan:end -->"),
           "decode": ("<!-- tpu-decode:start -->", "<!-- tpu-decode:end -->")}


def experiment(name: str, rollout: str = "scan", remat: bool = True, batch: int | None = None):
    cfg = load_experiment(os.path.join(REPO, "experiments", f"{name}.py"))
    cfg.quiet_star.rollout_impl, cfg.model.remat = rollout, remat
    if batch:
        cfg.batch_size = batch
    return cfg


def train_row(name: str, slice_name: str, rollout: str, remat: bool, mesh_shape: tuple | None,
              batch: int | None = None) -> dict:
    """One compile of the train step (mesh.auto's choice when `mesh_shape` is None)."""
    cfg = experiment(name, rollout, remat, batch)
    devices, chip = chips.topology_devices(slice_name), chips.chip_of(slice_name)
    model_config, qs = configured_shapes(cfg)
    optimizer = make_optimizer(optimizer_config(cfg))
    clock = time.perf_counter()
    row = dict(kind="train", config=name, slice=slice_name, topology=chips.topology_name(slice_name),
               rollout=rollout, remat=remat, batch=cfg.batch_size)
    try:
        if mesh_shape is None:
            mesh, compiled, row["candidates"] = choose_mesh(devices, model_config, qs, optimizer, cfg, chip.hbm_bytes)
        else:
            mesh = sharding.make_mesh(*mesh_shape, devices=devices)
            compiled = compile_train_step(model_config, qs, optimizer, mesh, cfg)
    except UserError as e:
        return {**row, "error": str(e)}
    row.update(step_report(compiled, mesh, model_config, qs, cfg, chip))
    row["mesh"] = sharding.mesh_name(tuple(mesh.shape.values()))
    return {**row, "compile_s": round(time.perf_counter() - clock, 1)}


def decode_row(name: str, host: str) -> dict:
    cfg = experiment(name)
    model_config, qs = configured_shapes(cfg)
    mesh = sharding.make_mesh(1, -1, 1, devices=chips.topology_devices(host))
    clock = time.perf_counter()
    report = decode_preflight(model_config, qs, mesh, **DECODE)
    chip = chips.chip_of(host)
    report["mesh"] = sharding.mesh_name(tuple(mesh.shape.values()))
    return dict(kind="decode", config=name, slice=host, topology=chips.topology_name(host), **report,
                hbm_gb_per_chip=chips.gib(chip.hbm_bytes), compile_s=round(time.perf_counter() - clock, 1))


def planned(results: list[dict]):
    """(key, thunk) of every row, in the order that matters most first: the configured step
    on every slice, generation, then the variants at the chosen meshes."""
    def found(**key):
        return next((r for r in results if all(r.get(k) == v for k, v in key.items())), None)

    for name in CONFIGS:
        for s in SLICES:
            yield dict(kind="train", config=name, slice=s, rollout="scan", remat=True, batch=8), \
                lambda name=name, s=s: train_row(name, s, "scan", True, None)
    for name in CONFIGS:
        for host in HOSTS:
            yield dict(kind="decode", config=name, slice=host), lambda name=name, host=host: decode_row(name, host)
    for name in CONFIGS:
        for s in SLICES:
            base = found(kind="train", config=name, slice=s, rollout="scan", remat=True, batch=8)
            batch = 8
            if base is not None and "error" in base:  # the paper's batch does not divide: the next that does
                batch = 16
                yield dict(kind="train", config=name, slice=s, rollout="scan", remat=True, batch=batch), \
                    lambda name=name, s=s: train_row(name, s, "scan", True, None, batch=16)
                base = found(kind="train", config=name, slice=s, rollout="scan", remat=True, batch=batch)
            if base is None or "error" in base:
                continue
            shape = tuple(int(x) for x in base["mesh"].split("x"))
            for rollout, remat in VARIANTS[1:]:
                yield dict(kind="train", config=name, slice=s, rollout=rollout, remat=remat, batch=batch), \
                    lambda name=name, s=s, r=rollout, m=remat, b=batch, shape=shape: train_row(name, s, r, m, shape, b)


def slice_label(row: dict) -> str:
    chip = chips.chip_of(row["slice"])
    return f"{row['slice']} ({row['topology']}: {len(chips.topology_devices(row['slice']))} × {chip.hbm_bytes >> 30} GiB)"


def train_table(results: list[dict]) -> str:
    lines = ["| model | slice (topology: chips × HBM) | batch | rollout | layer remat | mesh (d×f×t) | peak GiB / chip "
             "| fits (≤ 90 %) | FLOPs / step (model) | est. step s (roofline) | est. MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted((r for r in results if r["kind"] == "train"),
                  key=lambda r: (CONFIGS.index(r["config"]), SLICES.index(r["slice"]), r["batch"],
                                 VARIANTS.index((r["rollout"], r["remat"]))))
    for r in rows:
        head = f"| {r['config']} | {slice_label(r)} | {r['batch']} | {r['rollout']} | {'on' if r['remat'] else 'off'} |"
        if "error" in r:
            lines.append(f"{head} — | — | no: {r['error']} | | | |")
            continue
        lines.append(f"{head} {r['mesh']} | **{r['peak_gb_per_device']:.2f}** | {'yes' if r['fits'] else 'no'} | "
                     f"{r['model_flops_per_step']:.3g} | {r['estimate_roofline_step_s']:.3g} | "
                     f"{r['estimate_roofline_mfu']:.0%} |")
    return "\n".join(lines)


def decode_table(results: list[dict]) -> str:
    lines = ["| model | host (topology: chips × HBM) | mesh (d×f×t) | params GiB / chip | temporaries GiB / chip "
             "| peak GiB / chip |", "|---|---|---|---|---|---|"]
    for r in sorted((r for r in results if r["kind"] == "decode"),
                    key=lambda r: (CONFIGS.index(r["config"]), HOSTS.index(r["slice"]))):
        lines.append(f"| {r['config']} | {slice_label(r)} | {r['mesh']} | {r['argument_gb_per_device']:.2f} | "
                     f"{r['temp_gb_per_device']:.2f} | **{r['peak_gb_per_device']:.2f}** |")
    return "\n".join(lines)


def write_tables(results: list[dict], doc: str) -> None:
    update_readme(doc, train_table(results), MARKERS["train"])
    update_readme(doc, decode_table(results), MARKERS["decode"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(REPO, "docs", "tpu_plan.json"))
    parser.add_argument("--doc", default=os.path.join(REPO, "docs", "scaling.md"))
    parser.add_argument("--fresh", action="store_true", help="discard the results file's rows and compile all")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the doc's tables from the results file")
    args = parser.parse_args()
    results = []
    if os.path.exists(args.results) and not args.fresh:
        with open(args.results) as f:
            results = json.load(f)
    if not args.tables_only:
        for key, compile_row in planned(results):
            if any(all(r.get(k) == v for k, v in key.items()) for r in results):
                continue
            row = compile_row()
            print(json.dumps(row), flush=True)
            results.append(row)
            with open(args.results + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.results + ".tmp", args.results)
    write_tables(results, args.doc)


if __name__ == "__main__":
    main()
