"""Pod rehearsal: the paper run's whole path at tiny shapes, on 2 processes x 4 CPU devices,
with every file on gs:// served by a real GCS API (fake-gcs-server) that the test starts.

HF Mistral (bf16 safetensors shards) -> convert straight to the bucket -> train with
init_from on a (fsdp=8) mesh joined by jax.distributed -> SIGTERM one process: both save
the same step -> the init_from model is deleted -> resume -> evaluate and generate from
the bucket. Nothing may land in a local `gs:` directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from gcs_emulator import delete_prefix, object_names, running_emulator
from hf_models import make_tiny_hf_model
from qstar_jax.data import arithmetic_problems, default_corpus
from qstar_jax.tokenizer import load_tokenizer
from test_train import _free_port
from tokenizers_local import train_bpe_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "qstar-test"
RUN = "runs/owm"
MODEL = "models/mistral-7b-v0.1"
TINY = ["--config.data.seq_len=24", "--config.quiet_star.n_ahead=4", "--config.quiet_star.n_ahead_talk=2",
        "--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_every=0"]


def _cli(module: str, args: list[str], env: dict, cwd, devices: int = 4, wait: bool = True):
    env = {**os.environ, **env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    argv = [sys.executable, "-m", module, *args]
    if not wait:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train_pod(env: dict, cwd, data_dir: str, steps: int) -> list[subprocess.Popen]:
    """The mistral_owm config on 2 processes x 4 devices (fsdp over all 8), workdir in the bucket."""
    port = _free_port()
    args = ["--config", os.path.join(REPO, "experiments", "mistral_owm.py"), "--workdir", f"gs://{BUCKET}/{RUN}",
            f"--config.init_from=gs://{BUCKET}/{MODEL}", f"--config.data.path={data_dir}", *TINY,
            f"--config.steps={steps}", f"--config.optimizer.total_steps={steps}", "--config.distributed.mode=on",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
    return [_cli("qstar_jax.train", [*args, f"--config.distributed.process_id={i}"], env, cwd, wait=False)
            for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def test_pod_rehearsal_on_a_bucket(tmp_path):
    hf_dir, data_dir, cwd = tmp_path / "hf", tmp_path / "open-web-math", tmp_path / "cwd"
    cwd.mkdir()
    train_bpe_json(str(hf_dir))
    make_tiny_hf_model("mistral_window", str(hf_dir), saved_dtype="bfloat16", max_shard_size="60KB",
                       vocab_size=load_tokenizer(str(hf_dir)).vocab_size, sliding_window=16)
    assert os.path.isfile(hf_dir / "model.safetensors.index.json")
    data_dir.mkdir()  # OpenWebMath's own layout: parquet shards with a "text" column
    pq.write_table(pa.table({"text": default_corpus(200, seed=5)}), data_dir / "train-00000-of-00001.parquet")
    problems = tmp_path / "gsm8k.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in arithmetic_problems(2, seed=9)))

    with running_emulator(BUCKET, str(tmp_path)) as env:
        _cli("qstar_jax.convert", ["--hf-checkpoint", str(hf_dir), "--output", f"gs://{BUCKET}/{MODEL}"], env, cwd,
             devices=1)
        procs = _train_pod(env, cwd, str(data_dir), steps=400)
        deadline = time.time() + 300
        while not any(n.startswith(f"{RUN}/checkpoints/2/") for n in object_names(env, BUCKET, f"{RUN}/checkpoints")):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host
        stopped = {int(line.split()[-2].rstrip(","))
                   for out in _finish(procs) for line in out.splitlines() if line.startswith("preempted: saved")}
        assert len(stopped) == 1, stopped  # both processes saved the same step
        step = stopped.pop()
        assert 2 <= step < 400

        delete_prefix(env, BUCKET, MODEL)  # a resumed run must not need init_from
        resumed = _finish(_train_pod(env, cwd, str(data_dir), steps=step + 2))
        assert f"resumed from step {step}" in resumed[0]
        assert f"step {step + 2}/{step + 2}" in resumed[0]

        workdir = f"gs://{BUCKET}/{RUN}"
        scores = json.loads(_cli("qstar_jax.evaluate", ["--checkpoint", workdir, "--task", "gsm8k", "--data",
                                                        str(problems)], env, cwd).stdout.strip().splitlines()[-1])
        assert scores["examples"] == 2 and 0.0 < scores["soft_score"] <= 1.0
        text = _cli("qstar_jax.generate", ["--checkpoint", workdir, "--prompt", "Ava has 3 apples.",
                                           "--max-new-tokens", "4"], env, cwd).stdout
        assert text.strip()

        names = object_names(env, BUCKET, RUN)
        for expected in ("metrics.jsonl", "model_config.json", "tokenizer/tokenizer.json", "tensorboard/",
                         f"checkpoints/{step + 2}/"):
            assert any(n.startswith(f"{RUN}/{expected}") for n in names), (expected, names[:20])
        logged = [json.loads(line)["step"] for line in _read(env, f"{RUN}/metrics.jsonl").splitlines()]
        assert max(logged) == step + 2
    assert not os.path.exists(cwd / "gs:") and os.listdir(cwd) == []


def _read(env: dict, name: str) -> str:
    import urllib.parse
    import urllib.request

    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
        return r.read().decode()
