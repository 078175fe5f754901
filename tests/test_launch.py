"""launch/: the TPU pod script's gcloud commands (dry run, no gcloud needed) and the SLURM
script's mapping from the SLURM environment to `jax.distributed`."""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
from process_env import forced_devices, without_compilation_cache
from test_train import SMALL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "gpu_slurm.sbatch")
TRAIN_ARGS = ["--config", "experiments/mistral_owm.py", "--workdir", "gs://bucket/runs/owm",
              "--config.steps=200", "--config.eval_tasks=gsm8k:data/gsm8k test.jsonl:50"]


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory) -> str:
    """A PATH with bash and dirname only: the dry run must not need gcloud (or git)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for tool in ("bash", "dirname"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return str(bin_dir)


def pod(bare_path, *args, env_extra=None) -> subprocess.CompletedProcess:
    env = {"PATH": bare_path, "HOME": os.environ.get("HOME", "/tmp"), **(env_extra or {})}
    return subprocess.run(["bash", TPU_POD, *args], check=False, env=env, capture_output=True, text=True, timeout=60)


def dry_run(bare_path, *args, env_extra=None) -> list[list[str]]:
    """The printed commands, each split back into argv as a shell would."""
    result = pod(bare_path, "--dry-run", *args, env_extra=env_extra)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def ssh_command(argv: list[str], worker: str) -> str:
    """The remote command of a `gcloud compute tpus tpu-vm ssh` argv, after checking its form."""
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"], argv
    assert "--zone=us-central2-b" in argv and f"--worker={worker}" in argv, argv
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return command


COMMON = ["--name", "pod1", "--zone", "us-central2-b"]


def test_create_spot_tpu_vm(bare_path):
    (argv,) = dry_run(bare_path, *COMMON, "--accelerator-type", "v5p-128", "--spot", "create")
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--zone=us-central2-b",
                    "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5", "--spot"]


def test_create_from_environment_and_queued_resources(bare_path):
    env = {"TPU_NAME": "pod1", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-32", "PROJECT": "proj",
           "PROVISIONING": "preemptible"}
    (argv,) = dry_run(bare_path, "create", env_extra=env)
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--zone=us-central2-b",
                    "--project=proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--preemptible"]
    (argv,) = dry_run(bare_path, "--queued", "--spot", "--version", "my-runtime", "create",
                      env_extra={**env, "PROVISIONING": ""})
    assert argv == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod1", "--node-id=pod1",
                    "--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32",
                    "--runtime-version=my-runtime", "--spot"]


def test_setup_copies_the_repo_and_installs_jax_tpu_on_every_worker(bare_path):
    archive, scp, install, stage = dry_run(bare_path, *COMMON, "--stage", "gcloud storage cp -r gs://b/m checkpoints/",
                                           "setup")
    assert archive[:3] == ["git", "-C", REPO] and archive[3:6] == ["archive", "--format=tar.gz", "-o"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5] == archive[6] and scp[6] == "pod1:qstar_jax.tar.gz"
    remote = shlex.split(ssh_command(install, "all"))
    assert "jax[tpu]==0.10.2" in remote and "~/qstar_jax/requirements.txt" in remote
    assert "-e" in remote and "tar" in remote
    assert ssh_command(stage, "all") == "cd ~/qstar_jax && gcloud storage cp -r gs://b/m checkpoints/"


def test_run_starts_the_same_training_on_every_worker_with_one_log_each(bare_path):
    (argv,) = dry_run(bare_path, *COMMON, "run", "--", *TRAIN_ARGS)
    remote = ssh_command(argv, "all")
    words = shlex.split(remote)
    start = words.index("python")
    assert words[start - 1] == "(nohup" and words[start:start + 3] == ["python", "-m", "qstar_jax.train"]
    assert words[start + 3:start + 3 + len(TRAIN_ARGS)] == TRAIN_ARGS  # passed through, quoting intact
    assert words[start + 3 + len(TRAIN_ARGS)] == "--config.mesh.auto=True"  # no mesh given: the chooser's
    assert "> ~/qstar_logs/train-$(hostname).log 2>&1 < /dev/null &" in remote
    assert "echo $! > ~/qstar_logs/train.pid" in remote


def test_a_mesh_given_to_run_is_kept_without_the_chooser(bare_path):
    mesh = ["--config.mesh.fsdp=8", "--config.mesh.tensor=2"]
    (argv,) = dry_run(bare_path, *COMMON, "run", "--", *TRAIN_ARGS, *mesh)
    words = shlex.split(ssh_command(argv, "all"))
    assert words[words.index("python") + 3:][:len(TRAIN_ARGS) + 2] == TRAIN_ARGS + mesh
    assert "--config.mesh.auto=True" not in words


def test_preflight_compiles_here_for_the_accelerator_type_before_the_slice_exists(bare_path):
    (argv,) = dry_run(bare_path, "--accelerator-type", "v5litepod-64", "preflight", "--", *TRAIN_ARGS)
    assert argv == ["env", "JAX_PLATFORMS=cpu", "python", "-m", "qstar_jax.train", "--preflight", "--topology",
                    "v5litepod-64", *TRAIN_ARGS, "--config.mesh.auto=True"]


def test_logs_stop_delete(bare_path):
    (logs,) = dry_run(bare_path, *COMMON, "--worker", "3", "logs")
    assert ssh_command(logs, "3") == "tail -n 200 -F ~/qstar_logs/train-*.log"
    (stop,) = dry_run(bare_path, *COMMON, "stop")
    assert ssh_command(stop, "all").startswith("kill -TERM $(cat ~/qstar_logs/train.pid)")
    (delete,) = dry_run(bare_path, *COMMON, "delete")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1", "--zone=us-central2-b", "--quiet"]
    (delete,) = dry_run(bare_path, *COMMON, "--queued", "delete")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod1"]
    assert "--force" in delete


def test_watch_recovers_a_preempted_slice_by_recreating_it_and_rerunning(bare_path):
    commands = dry_run(bare_path, *COMMON, "--queued", "--spot", "--accelerator-type", "v5litepod-64", "watch", "--",
                       *TRAIN_ARGS)
    run = dry_run(bare_path, *COMMON, "run", "--", *TRAIN_ARGS)
    assert [c[:5] for c in commands[:2]] == [["gcloud", "compute", "tpus", "queued-resources", "delete"],
                                             ["gcloud", "compute", "tpus", "queued-resources", "create"]]
    assert "--runtime-version=v2-alpha-tpuv5-lite" in commands[1] and "--spot" in commands[1]
    assert commands[-1] == run[0]  # the very same training command: it resumes from the checkpoint


@pytest.mark.parametrize("args, message", [
    (["create"], "--zone"),
    (["--zone", "z", "launch"], "unknown subcommand 'launch'"),
    (["--zone", "z", "run"], "run needs the training arguments after --"),
    (["--zone", "z", "--accelerator-type", "v9-8", "create"], "no default --version"),
    (["--zone", "z", "--queued", "--preemptible", "create"], "queued resources take --spot"),
    (["--zone", "z", "--colour", "red", "create"], "unknown option --colour"),
    (["--zone"], "--zone needs a value"),
])
def test_bad_input_is_one_line(bare_path, args, message):
    result = pod(bare_path, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_shellcheck_and_bash_syntax():
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found (pip install -r requirements-test.txt)"
    result = subprocess.run([shellcheck, TPU_POD, SLURM], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    for script in (TPU_POD, SLURM):
        assert subprocess.run(["bash", "-n", script], check=False).returncode == 0


# ------------------------------------------------------------------------------------ SLURM


def sbatch_options() -> dict[str, str]:
    with open(SLURM) as f:
        return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", f.read(), flags=re.MULTILINE))


def test_slurm_environment_maps_to_jax_distributed(monkeypatch):
    """What jax.distributed.initialize() derives from a SLURM step (the script passes no address)."""
    from jax._src.clusters import ClusterEnv

    for name in [n for n in os.environ if n.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_"))]:
        monkeypatch.delenv(name)
    # Task 9 of 16: second node (local task 1) of a 2-node x 8-GPU step.
    monkeypatch.setenv("SLURM_JOB_ID", "123457")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[017-018]")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    address, processes, process_id, local_devices = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None)
    assert (address, processes, process_id, local_devices) == ("gpu017:62017", 16, 9, [1])  # 61440 + 123457 % 4096
    # One process per GPU, each seeing its node's GPUs: the layout that mapping assumes.
    options = sbatch_options()
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert "gpus-per-task" not in options and "gpu-bind" not in options


def _free_slurm_port() -> int:
    """A free port in SlurmCluster's range 61440 + job_id % 4096."""
    for port in random.sample(range(61440, 65536), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 61440..65535")


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: SLURM_NTASKS local tasks with the step variables SLURM sets for each.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_STEP_NODELIST=localhost SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$SRUN_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def test_slurm_script_trains_as_one_job_of_two_processes(tmp_path):
    """The sbatch script under a stand-in srun: 2 tasks of 1 CPU device each form one 2-device
    mesh only if they found each other through the SLURM environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    workdir = tmp_path / "run"
    env = {**without_compilation_cache(dict(os.environ)), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SRUN_LOGS": str(tmp_path),
           "SLURM_JOB_ID": str(_free_slurm_port() - 61440), "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": REPO,
           "VENV": sys.prefix, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": forced_devices(1)}
    args = ["--config", "experiments/tiny_cpu.py", "--workdir", str(workdir), *SMALL, "--config.steps=2",
            "--config.eval_every=0", "--config.mesh.data=2"]
    result = subprocess.run(["bash", SLURM, *args], check=False, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join((tmp_path / f"task{i}.log").read_text()[-2000:] for i in range(2))
    assert result.returncode == 0, result.stderr + logs
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
