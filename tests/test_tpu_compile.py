"""Compiled for TPUs without a TPU: the real TPU compiler (libtpu) on abstract slices.

A tiny model's train step (scan and two_pass rollouts) and thinking decode step compile for two small topologies
(v4:2x2x1, whose megacore chips are one device each, and v5e:2x2); the compiled programs'
input shardings give each chip its share of the parameters, the pre-flight reports a peak
under the chip's HBM, the mesh chooser picks the lowest fitting peak, and a mesh or slice
that cannot work is one line.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qstar_jax.errors import UserError
from qstar_jax.inference.preflight import compile_decode, decode_preflight
from qstar_jax.method.mixing import params_shape_fn
from qstar_jax.models import chips, sharding
from qstar_jax.training import preflight
from qstar_jax.training.setup import optimizer_config
from qstar_jax.training.step import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments import tiny_cpu  # noqa: E402


def small_config():
    """tiny_cpu's model with short thoughts and rows: the compiles stay a few seconds each."""
    cfg = tiny_cpu.get_config()
    cfg.quiet_star.update(n_ahead=4, n_ahead_talk=2)
    cfg.data.seq_len, cfg.batch_size, cfg.preflight_vocab_size = 16, 4, 258
    return cfg


@functools.cache
def chosen_on_v4():
    """mesh.auto on a v4-8 (4 megacore chips): every candidate compiled, the pick's step kept."""
    cfg = small_config()
    model_config, qs = preflight.configured_shapes(cfg)
    devices = chips.topology_devices("v4:2x2x1")
    optimizer = make_optimizer(optimizer_config(cfg))
    mesh, compiled, tried = preflight.choose_mesh(devices, model_config, qs, optimizer, cfg, chips.CHIPS["v4"].hbm_bytes)
    return cfg, model_config, qs, mesh, compiled, tried


def chip_share(tree_of_shardings, abstract_tree) -> float:
    """Bytes one chip holds of the tree, over the tree's bytes, from compiled shardings."""
    leaves = jax.tree.leaves(abstract_tree)
    held = sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for s, a in zip(jax.tree.leaves(tree_of_shardings), leaves))
    return held / sum(np.prod(a.shape) * a.dtype.itemsize for a in leaves)


def expected_share(abstract_tree, mesh) -> float:
    """The same share from the partition rules alone."""
    shardings = sharding.param_shardings(abstract_tree, mesh)
    return chip_share(shardings, abstract_tree)


def test_megacore_generations_are_one_device_per_chip():
    assert len(chips.topology_devices("v4:2x2x1")) == 4  # a v4-8 host: 4 chips, as the runtime shows them
    assert len(chips.topology_devices("v4-32")) == 16
    assert len(chips.topology_devices("v5e:2x2")) == 4


def test_a_mesh_axis_may_split_a_physical_torus_axis():
    """tensor 2 on a v6e-16 (4 x 4 chips) is no product of whole torus axes; it still builds."""
    mesh = sharding.make_mesh(1, 8, 2, devices=chips.topology_devices("v6e:4x4"))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in chips.topology_devices("v6e:4x4"))


def test_mesh_chooser_compiles_each_candidate_and_takes_the_lowest_fitting_peak():
    _, _, _, mesh, compiled, tried = chosen_on_v4()
    # tiny_cpu has 2 KV heads: tensor 1 or 2, data 1 (data > 1 only replicates state)
    assert [t["mesh"] for t in tried] == ["1x4x1", "1x2x2"]
    best = min(tried, key=lambda t: t["peak_gb_per_device"])
    assert sharding.mesh_name(tuple(mesh.shape.values())) == best["mesh"]
    assert compiled.step.memory_analysis() is not None


def test_train_step_compiles_for_v4_with_each_chip_holding_its_share():
    cfg, model_config, qs, mesh, compiled, _ = chosen_on_v4()
    state_shardings = compiled.step.input_shardings[0][0]
    params_in = compiled.state_in.params
    share = chip_share(state_shardings.params, params_in)
    assert share == pytest.approx(expected_share(params_in, mesh))
    assert 1 / mesh.size <= share < 1.1 / mesh.size  # only norm scales and thought vectors stay whole
    report = preflight.step_report(compiled, mesh, model_config, qs, cfg, chips.CHIPS["v4"])
    assert report["compiler"] == "tpu" and report["chip"] == "v4"
    assert 0 < report["peak_gb_per_device"] < report["hbm_gb_per_chip"] and report["fits"]
    assert report["estimate_roofline_step_s"] > 0 and 0 < report["estimate_roofline_mfu"] <= 1


def test_two_pass_train_step_compiles_sharded_for_v5e_on_a_tensor_mesh():
    cfg = small_config()
    cfg.quiet_star.rollout_impl = "two_pass"  # the 7B configs' rollout
    model_config, qs = preflight.configured_shapes(cfg)
    mesh = sharding.make_mesh(1, 2, 2, devices=chips.topology_devices("v5e:2x2"))
    optimizer = make_optimizer(optimizer_config(cfg))
    compiled = preflight.compile_train_step(model_config, qs, optimizer, mesh, cfg)
    params_in = compiled.state_in.params
    q_proj = compiled.step.input_shardings[0][0].params["lm"]["layers"]["q_proj"]["kernel"]
    assert q_proj.shard_shape(params_in["lm"]["layers"]["q_proj"]["kernel"].shape) == (2, 32, 32)  # (L, D/2, H*K/2)
    assert chip_share(compiled.step.input_shardings[0][0].params, params_in) == pytest.approx(
        expected_share(params_in, mesh))
    report = preflight.step_report(compiled, mesh, model_config, qs, cfg, chips.CHIPS["v5e"])
    assert 0 < report["peak_gb_per_device"] < 16 and report["fits"]


@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5e:2x2"])
def test_thinking_decode_step_compiles_for_a_tpu_host(topology):
    model_config, qs = preflight.configured_shapes(small_config())
    mesh = sharding.make_mesh(1, -1, 1, devices=chips.topology_devices(topology))
    compiled = compile_decode(model_config, qs, mesh, batch=2, prompt_len=8, new_tokens=4)
    params_sharding = compiled.input_shardings[0][0]
    params_abstract = jax.eval_shape(params_shape_fn(model_config, qs))
    assert chip_share(params_sharding, params_abstract) == pytest.approx(expected_share(params_abstract, mesh))
    report = decode_preflight(model_config, qs, mesh, batch=2, prompt_len=8, new_tokens=4)
    assert 0 < report["peak_gb_per_device"] < chips.gib(chips.chip_of(topology).hbm_bytes)


def test_a_mesh_that_splits_heads_or_rows_is_refused_naming_the_ones_that_work():
    mesh = sharding.make_mesh(1, 1, 4, devices=chips.topology_devices("v5e:2x2"))
    with pytest.raises(UserError) as e:
        sharding.check_mesh_divides(mesh, batch=4, heads=4, kv_heads=2)
    assert str(e.value) == ("mesh 1x1x4: tensor 4 does not divide the 2 KV heads; meshes (data x fsdp x tensor) of 4 "
                            "devices that would: 1x4x1, 2x2x1, 4x1x1, 1x2x2, 2x1x2 (or mesh.auto=True)")


def preflight_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "qstar_jax.train", "--config", "experiments/tiny_cpu.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


# 4.8B parameters with their Adam moments on a v5e:2x2 (16 GiB a chip): the TPU compiler refuses
# the state's initialisation instead of reporting a peak (small rows keep the compile short)
TOO_BIG_FOR_V5E = ("--config.model.hidden_size=4096", "--config.model.intermediate_size=16384",
                   "--config.model.num_layers=24", "--config.data.seq_len=16", "--config.batch_size=4",
                   "--config.quiet_star.n_ahead=4", "--config.quiet_star.n_ahead_talk=2",
                   "--config.preflight_vocab_size=258")


@pytest.mark.parametrize("args, message", [
    (("--preflight", "--topology", "v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=1",
      "--config.mesh.tensor=4"), "error: mesh 1x1x4: tensor 4 does not divide the 2 KV heads; meshes"),
    (("--preflight", "--topology", "v5e:2x2", "--config.mesh.fsdp=-1", "--config.mesh.data=1",
      "--config.batch_size=6"), "error: mesh 1x4x1: data x fsdp = 4 does not divide the batch of 6; meshes"),
    (("--preflight", "--topology", "v9:2x2"), "error: unknown TPU topology 'v9:2x2'"),
    (("--preflight", "--topology", "v5e:3x3"), "error: cannot describe TPU topology v5e:3x3: INVALID_ARGUMENT"),
    (("--topology", "v5e:2x2", "--workdir", "unused"), "error: --topology compiles for a TPU slice this machine"),
    (("--preflight", "--topology", "v5e:2x2", "--config.mesh.auto=True", *TOO_BIG_FOR_V5E),
     "error: no mesh fits 16.0 GiB per device with 10% free: state initialisation on mesh 1x4x1 does not fit: "
     "RESOURCE_EXHAUSTED: Ran out of memory on HBM"),
])
def test_bad_topology_or_mesh_is_one_line(args, message):
    result = preflight_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message)


def test_topology_preflight_prints_the_tpu_report():
    result = preflight_cli("--preflight", "--topology", "v5litepod-4", "--config.mesh.data=1", "--config.mesh.fsdp=4",
                           "--config.quiet_star.n_ahead=4", "--config.quiet_star.n_ahead_talk=2",
                           "--config.data.seq_len=16", "--config.batch_size=4", "--config.preflight_vocab_size=258")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["topology"] == "v5e:2x2" and report["compiler"] == "tpu" and report["devices"] == 4
    for key in ("argument_gb_per_device", "temp_gb_per_device", "output_gb_per_device", "peak_gb_per_device",
                "compiler_flops_per_chip_loop_bodies_once", "compiler_bytes_accessed_per_chip_loop_bodies_once"):
        assert report[key] > 0, key
    assert report["peak_gb_per_device"] < report["hbm_gb_per_chip"] == 16


def test_the_scaling_doc_tables_are_the_plan_results_file_rendered(tmp_path):
    """docs/scaling.md's TPU tables are written by benchmarks/tpu_plan.py from
    docs/tpu_plan.json alone: rendering the committed file again changes nothing."""
    doc = tmp_path / "scaling.md"
    doc.write_text(open(os.path.join(REPO, "docs", "scaling.md")).read())
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "tpu_plan.py"), "--tables-only",
                             "--doc", str(doc)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert doc.read_text() == open(os.path.join(REPO, "docs", "scaling.md")).read()
    with open(os.path.join(REPO, "docs", "tpu_plan.json")) as f:
        rows = json.load(f)
    trained = [r for r in rows if r["kind"] == "train" and "error" not in r]
    assert trained and all(r["compiler"] == "tpu" and r["peak_gb_per_device"] > 0 for r in trained)
    for r in trained:  # each row's figure is in the table, with its mesh
        assert f"| {r['mesh']} | **{r['peak_gb_per_device']:.2f}** |" in doc.read_text()
