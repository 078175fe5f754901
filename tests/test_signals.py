"""Stop signals and storage failures during training: each ends in one line with its
documented exit status (docs/reliability.md), and nothing already written is lost."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

from process_env import without_compilation_cache
from test_train import REPO, _free_port, _one_line_error, assert_ok, run_train, train_command

from qstar_jax.errors import UserError
from qstar_jax.training import hooks, storage
from qstar_jax.training.checkpoint import CheckpointReader
from qstar_jax.training.manifest import MANIFEST_FILE
from qstar_jax.training.metrics import LogWriteFailed, MetricsLog

# A run that goes on long after the signal (SMALL's optimizer.total_steps=6 keeps the base
# run's compiled step, so the session's compilation cache has it).
LONG = ["--config.steps=200", "--config.eval_every=0"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A SMALL run of 3 steps (checkpoint 3), continued by each test in a copy of its own."""
    workdir = tmp_path_factory.mktemp("base_run") / "run"
    assert_ok(run_train(workdir, "--config.steps=3", "--config.eval_every=0"))
    return workdir


def _copy(base_run, tmp_path):
    return shutil.copytree(base_run, tmp_path / "run")


def _intact_steps(workdir) -> list[int]:
    """The steps that have a manifest and match it (what the same command resumes from)."""
    reader = CheckpointReader(str(workdir / "checkpoints"))
    steps = [s for s in reader.steps() if (reader.step_dir(s) / MANIFEST_FILE).exists() and reader.verify(s) is None]
    reader.close()
    return steps


def _read_until(stream, fragment: str, proc) -> None:
    for line in stream:
        if fragment in line:
            return
    pytest.fail(f"{fragment!r} never came (exit {proc.wait()}): {proc.stderr.read()[-3000:]}")


def _own_lines(stderr: str) -> list[str]:
    """stderr without absl's log lines."""
    return [line for line in stderr.splitlines() if line and not line.startswith(("W1", "I1"))]


def test_sigterm_while_compiling_ends_before_the_first_step_and_saves_nothing(tmp_path, base_run):
    """A preemption notice while the run compiles: nothing new exists to save, so the run
    ends once the step is compiled, in one line with exit 0 (the scheduler reruns it); the
    checkpoint and metrics.jsonl are as they were."""
    workdir = _copy(base_run, tmp_path)
    logged = (workdir / "metrics.jsonl").read_bytes()
    proc = run_train(workdir, *LONG, wait=False)
    _read_until(proc.stdout, "data:", proc)  # what the run does next is compile the step
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines()[-1] == "preempted before the first step: nothing new to save", out
    assert "step 4/" not in out and _own_lines(err) == [], err[-3000:]
    assert _intact_steps(workdir) == [3]
    assert (workdir / "metrics.jsonl").read_bytes() == logged


def _importing_jax(pid: int) -> bool:
    """Whether process `pid` has begun importing JAX (jaxlib's native library is mapped)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("jaxlib" in line for line in f)


def test_sigterm_while_python_imports_jax_is_held_for_the_run(tmp_path, base_run):
    """A preemption notice in the first moments, while Python still imports JAX: held from
    the entry point's first line (Python's default would kill the run with 143 and no word)
    and acted on once the run's handler is installed: the same one line and exit 0."""
    workdir = _copy(base_run, tmp_path)
    proc = run_train(workdir, *LONG, wait=False)
    deadline = time.time() + 60
    while not _importing_jax(proc.pid):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines()[-1] == "preempted before the first step: nothing new to save", out
    assert _intact_steps(workdir) == [3]


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, base_run):
    """Ctrl-C while the run compiles asks it to stop (it says so at once); a second Ctrl-C,
    before the compile ends, stops it at once: exit 130, one line, no traceback, the
    checkpoint and the log untouched."""
    workdir = _copy(base_run, tmp_path)
    logged = (workdir / "metrics.jsonl").read_bytes()
    proc = run_train(workdir, *LONG, wait=False)
    _read_until(proc.stdout, "data:", proc)
    proc.send_signal(signal.SIGINT)
    _read_until(proc.stderr, "interrupted: stopping once the step is compiled, with nothing new to save (Ctrl-C "
                "again stops at once)", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert _own_lines(err) == ["interrupted: stopped at once before the first step; nothing new to save"], err
    assert "step 4/" not in out
    assert _intact_steps(workdir) == [3]
    assert (workdir / "metrics.jsonl").read_bytes() == logged


def test_a_closed_terminal_saves_a_checkpoint_and_exits_zero(tmp_path, base_run):
    """The run's terminal closes (the kernel sends SIGHUP, and writes to the terminal fail
    with EIO from then on): the run saves at the next step and exits 0, printing nowhere."""
    workdir = _copy(base_run, tmp_path)
    args, env = train_command(workdir, *LONG)
    master, terminal = pty.openpty()
    # In a session of its own, with the terminal as its controlling terminal (so the kernel
    # sends it SIGHUP when the terminal closes), as a shell in a terminal window starts it.
    proc = subprocess.Popen(["setsid", "--ctty", *args], cwd=REPO, env=env, stdin=terminal, stdout=terminal,
                            stderr=terminal)
    os.close(terminal)
    shown = b""
    while b"step 4/" not in shown:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the run closed the terminal (it ended)
            chunk = b""
        assert chunk, shown.decode(errors="replace")[-3000:]
        shown += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0
    assert max(_intact_steps(workdir)) > 4


def test_a_file_size_limit_at_a_save_is_one_line_and_the_previous_checkpoint_survives(tmp_path, base_run):
    """`ulimit -f` of 16 KiB: more than the logs this resumed run writes, less than the
    checkpoint's _METADATA (23 KB; its array data is cut into files of varying sizes).
    Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the run; the
    save of step 6 is one line, exit 2 (no traceback from the save's other writes), and step
    3 is intact."""
    workdir = _copy(base_run, tmp_path)
    args, env = train_command(workdir, "--config.steps=6", "--config.eval_every=0")
    result = subprocess.run(["bash", "-c", 'ulimit -f 16 && exec "$@"', "bash", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    _one_line_error(result, "cannot save checkpoint step 6", "file too large", "step 3 is intact")
    assert _intact_steps(workdir) == [3]


@pytest.mark.parametrize("file", ["metrics.jsonl", "tensorboard"])
def test_a_full_disk_under_the_logs_is_one_line_naming_the_file_and_the_newest_checkpoint(tmp_path, file):
    """A log write on a full disk (/dev/full put under the open file: ENOSPC) ends the run in
    one line (a UserError: exit 2) naming the file and the step a rerun resumes from; the
    lines logged before are kept, and nothing is left buffered to fail again at close."""
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "3" / MANIFEST_FILE).write_text("{}")
    (tmp_path / "checkpoints" / "6").mkdir()  # its run stopped before the manifest: a resume sets it aside
    log = MetricsLog(str(tmp_path), total_steps=10, start_step=0)
    for step in (1, 2):
        log.write(step, {"loss": 1.0})
    opened, path = (log.jsonl, log.jsonl_path) if file == "metrics.jsonl" else (log.tensorboard.file,
                                                                                  log.tensorboard.path)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, opened.fileno())
    os.close(full)
    with pytest.raises(LogWriteFailed) as failure:
        log.write(3, {"loss": 1.0})
    assert isinstance(failure.value, UserError)
    assert str(failure.value) == (f"cannot write {path}: no space left on device; newest checkpoint: step 3; what "
                                  "was logged before is kept; fix the storage and rerun the same command to resume")
    log.close()
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == ([1, 2] if file == "metrics.jsonl" else [1, 2, 3])  # TensorBoard comes after the line


def test_stop_signals_request_a_save_that_names_them(capfd):
    """In this process: Ctrl-C is a stop request, said at once on stderr, and the checkpoint
    hook then saves, waits for the save, says why it stopped and stops the run; an ignored
    SIGHUP (nohup) stays ignored. The newest checkpoint a stop at once would name follows
    the finished saves."""
    previous = {signum: signal.getsignal(signum) for signum in hooks.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        preempted = hooks.Preemption()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert not preempted.before_first_step(3)  # resumed from step 3, no stop requested yet
        ckpt = _FakeCheckpoints(saved=[3])
        save = hooks.SaveCheckpoint(ckpt, {}, 0, preempted)
        save(end := types.SimpleNamespace(step=6, state=None, selection=None, stop=False))
        assert (preempted.newest_checkpoint, end.stop) == (3, False)  # 6 is still being written
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.time() + 10
        while not preempted() and time.time() < deadline:
            time.sleep(0.01)
        assert preempted() and preempted.reason == "interrupted"
        save(end := types.SimpleNamespace(step=7, state=None, selection=None, stop=False))
        assert (preempted.newest_checkpoint, end.stop, ckpt.saved) == (7, True, [3, 6, 7])
        out, err = capfd.readouterr()
        assert out == "interrupted: saved checkpoint at step 7, exiting\n"
        assert err == "interrupted: saving a checkpoint at the next step, then stopping (Ctrl-C again stops at " \
                      "once, without saving)\n"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _FakeCheckpoints:
    """RunCheckpoints' saving side: a save is finished at the next `wait`."""

    def __init__(self, saved: list[int]):
        self.saved, self.in_flight = saved, None

    def wait(self) -> None:
        if self.in_flight is not None:
            self.saved.append(self.in_flight)
        self.in_flight = None

    def latest_step(self) -> int | None:
        return max(self.saved, default=None)

    def save(self, step, state, meta, selection, train_documents) -> None:
        self.wait()
        self.in_flight = step


_TWO_PROCESSES = """
import sys, time, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from qstar_jax.training.hooks import Preemption
preempted = Preemption()
print("ready", flush=True)
while not preempted():
    time.sleep(0.01)
print(f"{preempted.reason} at check {preempted.checks}", flush=True)
"""


def test_ctrl_c_on_one_process_of_several_stops_every_process_at_the_same_check():
    """With several processes a Ctrl-C (or SIGHUP) goes to JAX's preemption service as a
    SIGTERM, so every process stops at the same sync point (a save is a collective)."""
    address = f"127.0.0.1:{_free_port()}"
    env = without_compilation_cache({**os.environ, "PYTHONPATH": REPO})
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, address, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for proc in procs:
            _read_until(proc.stdout, "ready", proc)
        procs[1].send_signal(signal.SIGINT)
        ends = [proc.communicate(timeout=120) for proc in procs]
    finally:  # a process left waiting for the other at a failure
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in ends]
    (first, check), (second, same_check) = (out.strip().split(" at check ") for out, _ in ends)
    assert (first, second, check) == ("preempted", "interrupted", same_check)


def test_only_the_late_writes_of_a_failed_save_are_dropped_from_the_unraisable_exceptions():
    """What tensorstore reports for each write it finishes after a failed save closed Orbax's
    event loop is dropped (without that, most runs of the EFBIG test above print tens to
    hundreds of such traceback lines); any other unraisable exception is shown."""
    shown = []
    hook = storage._LateWritesOfAFailedSave(shown.append)
    late, other = (types.SimpleNamespace(exc_value=error) for error in (RuntimeError("Event loop is closed"),
                                                                       RuntimeError("a bug")))
    hook(late)
    hook(other)
    assert shown == [other]
