"""The training program end to end: runs, sharding, multi-process, resume, preemption, bad input."""

from __future__ import annotations

import glob
import json
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from process_env import forced_devices, without_compilation_cache

from qstar_jax.training import checkpoint
from qstar_jax.training import manifest
from qstar_jax.models import sharding
from qstar_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, fast variant of experiments/tiny_cpu.py.
SMALL = [
    "--config.steps=6", "--config.log_every=1", "--config.eval_every=3", "--config.eval_batches=1",
    "--config.checkpoint_every=3", "--config.batch_size=8", "--config.data.seq_len=24",
    "--config.data.default_documents=300", "--config.data.eval_documents=20", "--config.tokenizer_vocab_size=300",
    "--config.quiet_star.n_ahead=4", "--config.quiet_star.n_ahead_talk=2", "--config.optimizer.total_steps=6",
]


def train_command(workdir, *overrides, devices=1, env_extra=None, config="experiments/tiny_cpu.py"):
    """(argv, env) of a SMALL training run."""
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": forced_devices(devices),
           "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    if "--config.distributed.mode=on" in overrides:
        env = without_compilation_cache(env)
    args = [sys.executable, "-m", "qstar_jax.train", "--config", config, "--workdir", str(workdir), *SMALL, *overrides]
    return args, env


def run_train(workdir, *overrides, devices=1, env_extra=None, wait=True, config="experiments/tiny_cpu.py"):
    args, env = train_command(workdir, *overrides, devices=devices, env_extra=env_extra, config=config)
    if not wait:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(workdir) if "loss" in m}


def final_params(workdir):
    ckpt = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints"), keep=10)
    step = ckpt.latest_step()
    params, _ = ckpt.restore_params(step, sharding.host_mesh())
    ckpt.close()
    return step, params


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One SMALL run of 6 steps on 1 device, shared by the tests that only read it (its own
    compilation cache, so the test below sees what a run writes there)."""
    workdir, cache = tmp_path_factory.mktemp("tiny_run"), tmp_path_factory.mktemp("tiny_run_jax_cache")
    return workdir, cache, run_train(workdir, f"--config.compilation_cache_dir={cache}")


def test_tiny_run_leaves_checkpoints_logs_and_model_files(tiny_run):
    tmp_path, cache, result = tiny_run
    assert_ok(result)
    assert any("train_step" in name for name in os.listdir(cache)), os.listdir(cache)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert os.listdir(tmp_path / "tensorboard")
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    assert any("eval/loss" in m for m in metrics(tmp_path))
    assert os.path.isfile(tmp_path / "model_config.json") and os.path.isdir(tmp_path / "tokenizer")
    assert "step 6/6" in result.stdout
    assert not (tmp_path / "profile").exists()  # profile_steps is 0 by default
    for line in ("loaded model from a random init", "data: 280 training documents", "compiled the train step",
                 "model FLOPs per step"):
        assert line in result.stdout, line
    logged = [m for m in metrics(tmp_path) if "loss" in m]
    passes = 1 + 2 * (4 - 1 + 2 - 1)  # base pass + n_passes x (thought and talk steps), SMALL's n_ahead 4-2
    for m in logged:
        assert m["token_passes_per_s"] == pytest.approx(m["tokens_per_s"] * passes)
        assert 0 < m["mfu"] < 1


@pytest.mark.parametrize("rollout", ["scan", "two_pass"])
def test_sharded_run_matches_single_device(tmp_path, tiny_run, rollout):
    """The first 3 steps on 1 CPU device vs 8 forced devices as data=2 x fsdp=4: same losses
    (<= 1e-5 rel). The schedule is the same (total_steps 6), so stopping at 3 changes nothing.
    The one-device run uses the scan rollout; two_pass gives its losses (test_quiet_star holds
    the two equal on one device). With XLA:CPU's concurrency-optimised scheduler on, the
    two_pass run deadlocks in its collectives at these shapes (qstar_jax/training/trainer.py)."""
    one, _, result = tiny_run
    assert_ok(result)
    assert_ok(run_train(tmp_path, "--config.steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                        f"--config.quiet_star.rollout_impl={rollout}", devices=8))
    a, b = {s: loss for s, loss in train_losses(one).items() if s <= 3}, train_losses(tmp_path)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_gated_training_on_8_devices_matches_one(tmp_path):
    """A think gate and gated training (half the positions think, chosen by the gate plus
    exploration) shard like the rest: the same losses on 1 device and on data=2 x fsdp=4."""
    gated = ["--config.steps=2", "--config.eval_every=0", "--config.quiet_star.think_gate=mlp",
             "--config.quiet_star.think_share=0.5"]
    assert_ok(run_train(tmp_path / "one", *gated))
    assert_ok(run_train(tmp_path / "eight", *gated, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8))
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    assert all("think_gate_loss" in m for m in metrics(tmp_path / "eight") if "loss" in m)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GATED = ["--config.quiet_star.think_gate=linear", "--config.quiet_star.think_share=0.5"]


@pytest.mark.parametrize("selection", ["every", "gated"])
def test_two_processes_train_in_lockstep_like_one(tmp_path, selection):
    """2 local processes (jax.distributed, localhost coordinator) == 1 process with 2 devices,
    thinking at every position or at half of them (chosen by a think gate plus exploration,
    whose random draws must agree across the processes)."""
    reference = tmp_path / "reference"
    short = ["--config.steps=3", "--config.eval_every=0", *(GATED if selection == "gated" else [])]
    assert_ok(run_train(reference, *short, "--config.mesh.data=2", devices=2))
    procs = _two_process_run(tmp_path / "multi", *short)
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    step_a, params_a = final_params(reference)
    step_b, params_b = final_params(tmp_path / "multi")
    assert step_a == step_b == 3
    assert ("think_gate" in params_b) == (selection == "gated")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), params_a, params_b)
    assert train_losses(tmp_path / "multi") == pytest.approx(train_losses(reference), rel=1e-5)


def _two_process_run(workdir, *overrides):
    port = _free_port()
    return [
        run_train(workdir, *overrides, "--config.mesh.data=2", "--config.distributed.mode=on",
                  f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                  "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", wait=False)
        for i in range(2)
    ]


def test_two_pass_across_processes_on_cpu_is_refused_by_every_process(tmp_path):
    for proc in _two_process_run(tmp_path, "--config.steps=1", "--config.quiet_star.rollout_impl=two_pass"):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith(
            "error: quiet_star.rollout_impl='two_pass' on the CPU devices of several processes is not supported")


def test_locked_workdir_stops_every_process_of_a_multi_process_run(tmp_path):
    """Process 0 finds the workdir locked and tells process 1: both exit 2 in one line, and
    nothing is written."""
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / "run.lock", "w") as holder:
        holder.write(json.dumps({"host": "elsewhere", "pid": 4242, "started": "earlier"}))
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        procs = _two_process_run(tmp_path, "--config.steps=3")
        results = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=300)) for p in procs]
    for proc, result in zip(procs, results):
        result.returncode = proc.returncode
        assert result.returncode == 2, result.stderr[-3000:]
    _one_line_error(results[0], "in use by another run", "host elsewhere, pid 4242, started earlier")
    _one_line_error(results[1], "in use by another run (process 0 says why)")
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]


def test_second_run_on_a_busy_workdir_exits_2_and_the_first_is_intact(tmp_path, tiny_run):
    """Run B starts while run A (the tiny run's settings) holds the workdir: B exits 2 naming
    A's pid; A finishes exactly as the tiny run did (same parameters, each step logged once)."""
    assert_ok(tiny_run[2])
    first = run_train(tmp_path, wait=False)
    deadline = time.time() + 120
    while not os.path.isfile(tmp_path / "run.lock") or f'"pid": {first.pid}' not in (tmp_path / "run.lock").read_text():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    second = run_train(tmp_path, "--config.seed=7")
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    _one_line_error(second, f"workdir {tmp_path} is in use by another run", f"pid {first.pid}")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    _, a = final_params(tiny_run[0])
    step, b = final_params(tmp_path)
    assert step == 6
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert [m["step"] for m in metrics(tmp_path)] == [m["step"] for m in metrics(tiny_run[0])]


def _in_mount_namespace(script: str) -> None:
    """Runs a bash script as root of a new user and mount namespace, where it may mount a
    small tmpfs (to fill it) or remount one read-only; the host's mounts are untouched."""
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "bash", "-euc", script], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"namespace script failed: {result.stderr[-3000:]}"


def _recorded(tmp_path, name: str) -> subprocess.CompletedProcess:
    """What `_shell_run(tmp_path, name, ...)` recorded inside the namespace."""
    return subprocess.CompletedProcess(name, int((tmp_path / f"{name}.rc").read_text()),
                                       (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text())


def _shell_run(out_dir, name: str, workdir, *overrides, background: bool = False) -> str:
    """A bash line running a SMALL training with its output and status kept in OUT_DIR/NAME.*."""
    args, env = train_command(workdir, *overrides)
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k in ("PYTHONPATH", "XLA_FLAGS",
                                                                                  "JAX_PLATFORMS",
                                                                                  "JAX_COMPILATION_CACHE_DIR"))
    out = f"{out_dir}/{name}"
    line = f"env {env_text} {shlex.join(args)} > {out}.out 2> {out}.err; echo $? > {out}.rc"
    return f"( set +e; {line} )" + (" &" if background else "")


def test_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_survives(tmp_path, tiny_run):
    """The tiny run (checkpoints 3 and 6) extended to 9 steps on a tmpfs with 200 KiB left:
    the save of step 9 is refused in one line (exit 2) naming step 6 as intact; nothing of
    step 9 is left behind, step 6 still verifies, and with room again the same command
    resumes from step 6."""
    assert_ok(tiny_run[2])
    mnt = tmp_path / "disk"
    mnt.mkdir()
    _in_mount_namespace(f"""
        mount -t tmpfs -o size=16m tmpfs {mnt}
        cp -a {tiny_run[0]} {mnt}/run
        mount -o remount,size=$(( $(du -sk {mnt} | cut -f1) + 200 ))k {mnt}
        {_shell_run(tmp_path, "full", mnt / "run", "--config.steps=9", "--config.checkpoint_every=3")}
        cp -a {mnt}/run {tmp_path}/after
    """)
    full = _recorded(tmp_path, "full")
    assert full.returncode == 2, full.stderr[-3000:]
    _one_line_error(full, "cannot save checkpoint step 9", "no space left on device", "step 6 is intact")
    assert sorted(os.listdir(tmp_path / "after" / "checkpoints")) == ["3", "6"]
    ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "after" / "checkpoints"), 10)
    assert ckpt.verify(6) is None
    ckpt.close()
    resumed = run_train(tmp_path / "after", "--config.steps=9", "--config.checkpoint_every=3")
    assert_ok(resumed)
    assert "resumed from step 6" in resumed.stdout


def test_a_disk_that_fills_in_the_middle_of_a_save_is_named_in_one_line(tmp_path):
    """When the space runs out after the check (another writer), Orbax's background writer
    fails; `wait` turns its error (a ValueError carrying the OS error) into the same line."""
    ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "checkpoints"), 2)
    error = ValueError("RESOURCE_EXHAUSTED: Error writing \"params/0\" in OCDBT database: Failed to write 1694570 "
                       "bytes to file 17: No space left on device [os_error_code='28']")
    ckpt._in_flight = 9  # a save in flight
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt.manager, "wait_until_finished", lambda: (_ for _ in ()).throw(error))
        with pytest.raises(checkpoint.CheckpointWriteFailed,
                           match="cannot save checkpoint step 9 .*: no space left on device; no earlier checkpoint"):
            ckpt.wait()
        patch.setattr(ckpt.manager, "wait_until_finished", lambda: (_ for _ in ()).throw(ValueError("other")))
        with pytest.raises(ValueError, match="other"):  # not a storage failure: ours to see in full
            ckpt.wait()
    ckpt.close()


def test_read_only_workdir_is_one_line_for_every_process(tmp_path, tiny_run):
    """A read-only workdir (a finished run, and a new one under a read-only mount) is one
    line before anything runs; in a two-process run process 0 fails to lock it and process 1
    stops too instead of waiting for it."""
    assert_ok(tiny_run[2])
    mnt = tmp_path / "ro"
    mnt.mkdir()
    port = _free_port()
    distributed = ["--config.mesh.data=2", "--config.distributed.mode=on",
                   f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
    _in_mount_namespace(f"""
        mount -t tmpfs -o size=16m tmpfs {mnt}
        cp -a {tiny_run[0]} {mnt}/run
        mount -o remount,ro {mnt}
        {_shell_run(tmp_path, "existing", mnt / "run")}
        {_shell_run(tmp_path, "new", mnt / "new")}
        {_shell_run(tmp_path, "proc0", mnt / "run", *distributed, "--config.distributed.process_id=0", background=True)}
        {_shell_run(tmp_path, "proc1", mnt / "run", *distributed, "--config.distributed.process_id=1", background=True)}
        wait
    """)
    _one_line_error(_recorded(tmp_path, "existing"), f"cannot write to --workdir {mnt}/run: Read-only file system")
    _one_line_error(_recorded(tmp_path, "new"), f"cannot write to --workdir {mnt}/new: Read-only file system")
    _one_line_error(_recorded(tmp_path, "proc0"), "Read-only file system")
    _one_line_error(_recorded(tmp_path, "proc1"), "process 0 could not take the lock")


def _wait_for_checkpoint(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_killed_run_resumes_bit_identically(tmp_path):
    long = ["--config.steps=16", "--config.optimizer.total_steps=16", "--config.checkpoint_every=4",
            "--config.eval_every=0"]
    assert_ok(run_train(tmp_path / "straight", *long))
    proc = run_train(tmp_path / "killed", *long, wait=False)
    _wait_for_checkpoint(tmp_path / "killed", 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = checkpoint.TrainCheckpoints(str(tmp_path / "killed" / "checkpoints"), 10).latest_step()
    assert interrupted_at is not None and interrupted_at < 16
    resumed = run_train(tmp_path / "killed", *long)
    assert_ok(resumed)
    assert f"resumed from step {interrupted_at}" in resumed.stdout
    step_a, a = final_params(tmp_path / "straight")
    step_b, b = final_params(tmp_path / "killed")
    assert step_a == step_b == 16
    # Steps logged before the kill and trained again are logged once, as in the straight run.
    assert [m["step"] for m in metrics(tmp_path / "killed")] == [m["step"] for m in metrics(tmp_path / "straight")]
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    proc = run_train(tmp_path, "--config.steps=200", "--config.optimizer.total_steps=200",
                     "--config.checkpoint_every=5", "--config.eval_every=0", wait=False)
    _wait_for_checkpoint(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = [line for line in out.splitlines() if line.startswith("preempted: saved checkpoint at step")]
    assert saved, out[-2000:]
    stopped_at = int(saved[0].split()[-2].rstrip(","))
    ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "checkpoints"), 10)
    assert ckpt.latest_step() == stopped_at and 5 <= stopped_at < 200


def test_sigterm_on_one_host_stops_every_process_at_the_same_step(tmp_path):
    """A pod preemption notice may reach one host first: JAX's preemption service must make
    every process save the same step (a save is a collective) and exit cleanly."""
    port = _free_port()
    procs = [
        run_train(tmp_path, "--config.steps=400", "--config.optimizer.total_steps=400", "--config.mesh.data=2",
                  "--config.checkpoint_every=5", "--config.eval_every=0", "--config.distributed.mode=on",
                  f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                  "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", wait=False)
        for i in range(2)
    ]
    _wait_for_checkpoint(tmp_path, 5, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    stopped = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        saved = [line for line in out.splitlines() if line.startswith("preempted: saved checkpoint at step")]
        assert saved, out[-2000:]
        stopped.append(int(saved[0].split()[-2].rstrip(",")))
    assert stopped[0] == stopped[1] and 5 <= stopped[0] < 400
    ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "checkpoints"), 10)
    assert ckpt.latest_step() == stopped[0]


# ------------------------------------------------------------------------------ bad input


def _one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith(("W1", "I1"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("key,value,message", [
    ("steps", 0, "steps must be >= 1, got 0"),
    ("batch_size", -8, "batch_size must be >= 1, got -8"),
    ("checkpoint_every", 0, "checkpoint_every must be >= 1"),
    ("log_every", 0, "log_every must be >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
    ("eval_every", -1, "eval_every must be >= 0"),
    ("data.eval_documents", -5, "data.eval_documents must be >= 0"),
    ("data.seq_len", 5, "data.seq_len (5) must be at least quiet_star.n_ahead_talk (4) + 2 under policy_positions"),
    ("quiet_star.policy_loss_weight", float("nan"), "quiet_star.policy_loss_weight must be a finite number, got nan"),
    ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate must be a finite number, got nan"),
    ("optimizer.learning_rate", -1e-3, "optimizer.learning_rate must be a finite number in [0, inf), got -0.001"),
    ("optimizer.b2", 1.0, "optimizer.b2 must be a finite number in [0, 1), got 1.0"),
    ("optimizer.eps", 0.0, "optimizer.eps must be a finite number in (0, inf), got 0.0"),
    ("profile_steps", -1, "profile_steps and profile_after must be >= 0"),
    ("data.seq_len", 1, "data.seq_len must be >= 2"),
    ("quiet_star.policy_positions", "all", "policy_positions must be one of 'official', 'full_horizon', got 'all'"),
    ("optimizer.schedule", "cosin", "optimizer.schedule must be one of constant, linear, cosine, got 'cosin'"),
])
def test_bad_run_settings_fail_before_anything_runs(tmp_path, key, value, message):
    """Checked up front (in-process: the `train` the CLI calls): a 0 found later costs a
    compile, or ends "successfully" with nothing trained or kept."""
    from experiments import tiny_cpu
    from qstar_jax.training import trainer

    cfg = tiny_cpu.get_config()
    *parents, leaf = key.split(".")
    functools.reduce(lambda c, name: c[name], parents, cfg)[leaf] = value
    with pytest.raises(UserError, match=re.escape(message)):
        trainer.train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_profile_steps_write_one_trace(tmp_path):
    assert_ok(run_train(tmp_path, "--config.steps=3", "--config.eval_every=0", "--config.profile_steps=1"))
    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, os.listdir(tmp_path)


def test_profiling_a_bucket_workdir_is_refused_up_front():
    from experiments import tiny_cpu
    from qstar_jax.training import trainer

    cfg = tiny_cpu.get_config()
    cfg.profile_steps = 1
    with pytest.raises(UserError, match="profile_steps writes a local trace; --workdir gs://b/run is in a bucket"):
        trainer.train(cfg, "gs://b/run")


def test_workdir_that_is_a_file(tmp_path):
    from experiments import tiny_cpu
    from qstar_jax.training import trainer

    (tmp_path / "run").write_text("notes")
    with pytest.raises(UserError, match="--workdir .*run is a file, not a directory"):
        trainer.train(tiny_cpu.get_config(), str(tmp_path / "run"))
    assert (tmp_path / "run").read_text() == "notes"


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("contents", ["model_directory", "unrelated_files", "lock_is_a_directory"])
def test_a_workdir_that_holds_no_run_is_refused_untouched(tmp_path, contents):
    """A converted model directory (model_config.json + params/), a folder of files no run
    wrote, or a run.lock that is a directory: one line naming what is there, nothing
    written, moved or deleted."""
    from experiments import tiny_cpu
    from qstar_jax.training import trainer

    workdir = tmp_path / "run"
    if contents == "model_directory":
        (workdir / "params").mkdir(parents=True)
        (workdir / "model_config.json").write_text("{}")
        (workdir / "tokenizer").mkdir()
        message = "is a model directory, not a training run"
    elif contents == "unrelated_files":
        (workdir / "thesis").mkdir(parents=True)
        (workdir / "notes.txt").write_text("mine")
        message = "holds files no training run wrote (notes.txt, thesis)"
    else:
        (workdir / "run.lock").mkdir(parents=True)
        (workdir / "metrics.jsonl").write_text("")
        message = "run.lock is not a lock file (a directory or device is in its place)"
    before = _tree(workdir)
    with pytest.raises(UserError, match=re.escape(message)):
        trainer.train(tiny_cpu.get_config(), str(workdir))
    assert _tree(workdir) == before


def test_a_finished_run_extends_and_refuses_a_changed_tokenizer(tmp_path, tiny_run):
    """steps 6 -> 7: the schedule's total_steps follows steps (noted, not refused) and the run
    trains step 7, here on 2 devices where the run had 1. A changed tokenizer setting is drift like any other: refused in one line
    before anything is compiled (the workdir's own tokenizer would silently be used)."""
    assert_ok(tiny_run[2])
    shutil.copytree(tiny_run[0], tmp_path, dirs_exist_ok=True)
    extend = ("--config.steps=7", "--config.optimizer.total_steps=0")  # 0: the schedule follows steps
    drift = run_train(tmp_path, *extend, "--config.tokenizer_vocab_size=400")
    _one_line_error(drift, "(tokenizer_vocab_size: 300 -> 400)")
    extended = run_train(tmp_path, *extend, devices=2)  # resumed onto another device count too
    assert_ok(extended)
    assert "resumed from step 6" in extended.stdout
    assert "note: steps changed, and with it optimizer.total_steps: 6 -> 7" in extended.stdout
    assert final_params(tmp_path)[0] == 7


def test_unknown_config_key(tmp_path):
    _one_line_error(run_train(tmp_path, "--config.optimizer.lr=1"), "unknown config key 'lr' (in --config.optimizer.lr)")
    _one_line_error(run_train(tmp_path, "--config.optimizr.lr=1"),
                    """unknown config key 'optimizr'; Did you mean "optimizer" instead of "optimizr"?""")


def test_missing_config_file(tmp_path):
    _one_line_error(run_train(tmp_path, config="experiments/nope.py"), "config file not found: experiments/nope.py")


def test_missing_data_directory_and_empty_dataset(tmp_path):
    _one_line_error(run_train(tmp_path / "w", "--config.data.source=files", f"--config.data.path={tmp_path}/nope"),
                    "data path does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    _one_line_error(run_train(tmp_path / "w", "--config.data.source=files", f"--config.data.path={tmp_path}/empty"),
                    "dataset is empty")


def test_checkpoint_of_another_architecture(tmp_path, tiny_run):
    assert_ok(tiny_run[2])
    shutil.copytree(tiny_run[0], tmp_path, dirs_exist_ok=True)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    _one_line_error(run_train(tmp_path, "--config.model.intermediate_size=128"),
                    "is for another model", "intermediate_size")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_a_resume_that_adds_a_think_gate_is_refused_and_older_settings_resume(tmp_path, tiny_run):
    """A gate changes the parameter tree, so even an allowed settings change cannot add one
    (every step would fail to read); quiet_star options added since a checkpoint was saved
    count as their defaults."""
    from qstar_jax.training.resume import changed_settings, with_new_defaults
    from qstar_jax.training.setup import result_settings
    from experiments import tiny_cpu

    assert_ok(tiny_run[2])
    shutil.copytree(tiny_run[0], tmp_path, dirs_exist_ok=True)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    _one_line_error(run_train(tmp_path, "--config.quiet_star.think_gate=linear", "--config.allow_config_change=True"),
                    "was trained with think_gate '', this run has 'linear'")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    current = result_settings(tiny_cpu.get_config())
    older = {**current, "quiet_star": {k: v for k, v in current["quiet_star"].items() if not k.startswith("think_")}}
    assert changed_settings(older, current) and not changed_settings(with_new_defaults(older, current), current)


def test_resume_with_changed_settings_is_refused_unless_allowed(tmp_path, tiny_run):
    assert_ok(tiny_run[2])
    shutil.copytree(tiny_run[0], tmp_path, dirs_exist_ok=True)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    _one_line_error(run_train(tmp_path, "--config.steps=7", "--config.quiet_star.n_ahead=5", "--config.seed=3"),
                    "checkpoint at step 6", "was trained with other settings", "quiet_star.n_ahead: 4 -> 5",
                    "seed: 0 -> 3", "--config.allow_config_change=True")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    allowed = run_train(tmp_path, "--config.steps=7", "--config.seed=3", "--config.allow_config_change=True")
    assert_ok(allowed)
    assert "warning: resuming step 6 with changed settings: seed: 0 -> 3" in allowed.stdout
    assert "7" in os.listdir(tmp_path / "checkpoints")


def _largest_state_file(step_dir):
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state")) for f in names]
    return max(files, key=os.path.getsize)


def _flip_bytes(path, count=64):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(count)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def test_manifest_names_what_changed_in_a_step(tmp_path):
    step = tmp_path / "7"
    (step / "state" / "d").mkdir(parents=True)
    (step / "state" / "d" / "a").write_bytes(b"x" * 1000)
    (step / "meta").write_text("{}")
    manifest.write_manifest(step)
    assert manifest.verify_step(step) is None
    (step / "state" / "d" / "a").write_bytes(b"x" * 999)
    assert manifest.verify_step(step) == "state/d/a has 999 bytes, 1000 when saved"
    (step / "state" / "d" / "a").write_bytes(b"y" * 1000)
    assert manifest.verify_step(step).startswith("state/d/a does not match its checksum (crc32:")
    (step / "meta").unlink()
    assert manifest.verify_step(step) == "meta is missing"
    (step / manifest.MANIFEST_FILE).write_text("{trunc")
    assert manifest.verify_step(step) == f"its {manifest.MANIFEST_FILE} is unreadable"


@pytest.mark.parametrize("damage", ["bit_flip", "bit_flip_without_manifest"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, tiny_run, damage):
    """Step 6 damaged: 64 bytes flipped in its largest file, which only the manifest can
    tell, or the same with no manifest (a run killed between Orbax's commit and the
    manifest): an unverifiable step is never resumed. The run moves step 6 aside with one
    line naming it, resumes from step 3, and ends bit-identical to the undamaged run."""
    assert_ok(tiny_run[2])
    shutil.copytree(tiny_run[0], tmp_path, dirs_exist_ok=True)
    ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "checkpoints"), 10)
    assert ckpt.verify(3) is None and ckpt.verify(6) is None
    step6 = str(tmp_path / "checkpoints" / "6")
    _flip_bytes(_largest_state_file(step6))
    if damage == "bit_flip":
        assert "does not match its checksum" in ckpt.verify(6)
        assert ckpt.latest_verified_step() == 3  # what the non-finite-loss message names
        with pytest.raises(UserError, match="checkpoint at step 6 .* is corrupt"):
            checkpoint.load_for_inference(str(tmp_path))
    else:
        os.remove(os.path.join(step6, manifest.MANIFEST_FILE))
    ckpt.close()
    resumed = run_train(tmp_path)
    assert_ok(resumed)
    why = "is corrupt: state/" if damage == "bit_flip" else f"is corrupt: it has no {manifest.MANIFEST_FILE}"
    warning = [line for line in resumed.stdout.splitlines() if line.startswith("warning: checkpoint at step 6")]
    assert len(warning) == 1 and why in warning[0] and "resuming from step 3" in warning[0], resumed.stdout
    assert "resumed from step 3" in resumed.stdout
    assert os.path.isdir(tmp_path / checkpoint.CORRUPT_DIR / "6" / "state")  # kept for inspection
    _, a = final_params(tiny_run[0])
    step, b = final_params(tmp_path)
    assert step == 6
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_ruinous_update_is_never_called_a_good_checkpoint(tmp_path, tiny_run):
    """The run goes on from step 6 at learning rate 1e30: step 7's update leaves finite but
    ruinous weights (saved, since checkpoint_every=1), and the loss computed from them at step
    8 is not finite. The run stops without saving, moves step 7 aside and names step 6, the
    newest checkpoint whose loss was finite, as the good one (not step 7)."""
    assert_ok(tiny_run[2])
    shutil.copytree(tiny_run[0], tmp_path, dirs_exist_ok=True)
    result = run_train(tmp_path, "--config.steps=9", "--config.checkpoint_every=1", "--config.allow_config_change=True",
                       "--config.optimizer.learning_rate=1e30", "--config.optimizer.grad_clip_norm=1e30")
    _one_line_error(result, "non-finite loss at step 8 (computed from the state after step 7)",
                    f"checkpoint step 7 held it or later states: moved to {checkpoint.CORRUPT_DIR}/",
                    "newest good checkpoint: step 6")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert os.listdir(tmp_path / checkpoint.CORRUPT_DIR) == ["7"]
    step, params = final_params(tmp_path)
    assert step == 6 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_a_workdir_whose_every_checkpoint_is_corrupt_never_starts_over_silently(tmp_path, tiny_run):
    """Steps 3 and 6 both damaged: the run names both in its one line and exits 2; the same
    command again is refused (it would start from a random init), with metrics.jsonl intact;
    only allow_fresh_start starts over, keeping the old metrics under a new name."""
    assert_ok(tiny_run[2])
    shutil.copytree(tiny_run[0], tmp_path, dirs_exist_ok=True)
    for step in ("3", "6"):
        _flip_bytes(_largest_state_file(str(tmp_path / "checkpoints" / step)))
    logged = (tmp_path / "metrics.jsonl").read_text()
    first = run_train(tmp_path)
    _one_line_error(first, "no checkpoint in", "step 6 is corrupt: state/", "step 3 is corrupt: state/",
                    "--config.allow_fresh_start=True")
    again = run_train(tmp_path)
    _one_line_error(again, "holds a run with no usable checkpoint", "set aside in corrupt_checkpoints/: 3, 6",
                    "metrics.jsonl logs steps")
    assert (tmp_path / "metrics.jsonl").read_text() == logged
    fresh = run_train(tmp_path, "--config.allow_fresh_start=True", "--config.steps=1")
    assert_ok(fresh)
    assert (tmp_path / "metrics.1.jsonl").read_text() == logged
    assert [m["step"] for m in metrics(tmp_path)] == [1, 1]  # train and eval lines of the new run


def test_paper_config_fails_fast_without_the_checkpoint(tmp_path):
    result = run_train(tmp_path, config="experiments/mistral_owm.py")
    _one_line_error(result, "init_from directory does not exist: checkpoints/mistral-7b-v0.1")


def test_preflight_reports_per_device_memory(tmp_path):
    result = run_train(tmp_path, "--preflight", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                       "--config.model.remat=True", "--config.preflight_vocab_size=302", devices=4)
    assert_ok(result)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert 0 < report["argument_gb_per_device"] <= report["peak_gb_per_device"]
    # loading: each device holds its shard of the params, then of params + two Adam moments
    assert 0 < report["loaded_params_gb_per_device"] < report["init_state_peak_gb_per_device"]



def test_mesh_auto_trains_on_the_mesh_it_chose(tmp_path):
    """mesh.auto compiles the step on each candidate mesh of the 2 devices (tensor 1 or 2:
    tiny_cpu has 2 KV heads) and trains on the lowest peak."""
    result = run_train(tmp_path, "--config.steps=1", "--config.eval_every=0", "--config.mesh.auto=True", devices=2)
    assert_ok(result)
    peaks = dict(re.findall(r"mesh (\d+x\d+x\d+): peak ([\d.]+) GiB per device", result.stdout))
    assert sorted(peaks) == ["1x1x2", "1x2x1"], result.stdout
    chosen = re.search(r"mesh.auto chose (\d+x\d+x\d+)", result.stdout).group(1)
    assert float(peaks[chosen]) == min(map(float, peaks.values()))
    assert sorted(train_losses(tmp_path)) == [1]


def test_two_pass_on_cpu_devices_is_refused_with_the_deadlocking_scheduler(tmp_path):
    flags = f"{forced_devices(2)} --xla_cpu_enable_concurrency_optimized_scheduler=true"  # the user's own setting
    result = run_train(tmp_path, "--config.steps=1", "--config.quiet_star.rollout_impl=two_pass", devices=2,
                       env_extra={"XLA_FLAGS": flags})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: quiet_star.rollout_impl='two_pass' on 2 CPU devices needs "
        "--xla_cpu_enable_concurrency_optimized_scheduler=false in XLA_FLAGS (qstar_jax/training/trainer.py says why); "
        "use rollout_impl='scan' or drop your setting")