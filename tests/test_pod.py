"""Pod rehearsal: the paper run's whole path at tiny shapes, on 2 processes x 4 CPU devices,
with every file on gs:// served by a real GCS API (fake-gcs-server) that the test starts.

HF Mistral (bf16 safetensors shards) -> convert straight to the bucket, the corpus rewritten
as parquet in the bucket -> train with
init_from on a (fsdp=8) mesh joined by jax.distributed -> SIGTERM one process: both save
the same step -> the init_from model is deleted -> resume -> evaluate and generate from
the bucket, thinking where the think gate says. The run trains with a think gate and
thinks at half of the positions (gated training), the most state and selection a run can
have; every-position thinking across processes is `test_train`'s. Nothing may land in a
local `gs:` directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from gcs_emulator import delete_prefix, object_names, running_emulator
from hf_models import make_tiny_hf_model
from process_env import forced_devices, without_compilation_cache
from qstar_jax.training.corpora import arithmetic_problems, default_corpus
from qstar_jax.tokenizer import load_tokenizer
from test_train import GATED, _free_port
from tokenizers_local import train_bpe_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "qstar-test"
RUN = "runs/owm"
MODEL = "models/mistral-7b-v0.1"
TINY = ["--config.data.seq_len=24", "--config.quiet_star.n_ahead=4", "--config.quiet_star.n_ahead_talk=2",
        "--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_every=0", "--config.eval_tasks=",
        *GATED]


def _env(env: dict, devices: int) -> dict:
    return {**os.environ, **env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": forced_devices(devices)}


def _cli(module: str, args: list[str], env: dict, cwd, devices: int = 4):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(env, devices),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class Pod:
    """The mistral_owm config on 2 processes x 4 devices (fsdp over all 8), workdir in the bucket.

    Output goes to files, not pipes: gcsfs logs a line per call without credentials, and a
    pipe nobody reads until the end fills up and blocks the process mid-write.
    """

    def __init__(self, env: dict, cwd, logs, data_dir: str, steps: int):
        port = _free_port()
        args = ["--config", os.path.join(REPO, "experiments", "mistral_owm.py"), "--workdir", f"gs://{BUCKET}/{RUN}",
                f"--config.init_from=gs://{BUCKET}/{MODEL}", f"--config.data.path={data_dir}", *TINY,
                # The schedule stays that of 400 steps: a resume may stop earlier, not change it.
                f"--config.steps={steps}", "--config.optimizer.total_steps=400", "--config.distributed.mode=on",
                # the config's two_pass is refused across CPU processes (training/trainer.py)
                "--config.quiet_star.rollout_impl=scan",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
        self.logs = [(logs / f"out{i}.log", logs / f"err{i}.log") for i in range(2)]
        self.procs = []
        for i, (out, err) in enumerate(self.logs):
            with open(out, "w") as stdout, open(err, "w") as stderr:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "qstar_jax.train", *args, f"--config.distributed.process_id={i}"],
                    cwd=cwd, env=without_compilation_cache(_env(env, 4)), stdout=stdout, stderr=stderr))

    def __enter__(self) -> "Pod":
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:  # never leave a process behind to load the rest of the suite
            proc.kill()
            proc.wait()

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def stderr(self, i: int) -> str:
        return self.logs[i][1].read_text()[-3000:]

    def finish(self) -> list[str]:
        for i, proc in enumerate(self.procs):
            assert proc.wait(timeout=600) == 0, self.stderr(i)
        return [out.read_text() for out, _ in self.logs]


def test_pod_rehearsal_on_a_bucket(tmp_path):
    hf_dir, corpus, cwd, logs = tmp_path / "hf", tmp_path / "corpus.jsonl", tmp_path / "cwd", tmp_path / "logs"
    cwd.mkdir()
    logs.mkdir()
    train_bpe_json(str(hf_dir))
    make_tiny_hf_model("mistral_window", str(hf_dir), saved_dtype="bfloat16", max_shard_size="60KB",
                       vocab_size=load_tokenizer(str(hf_dir)).vocab_size, sliding_window=16)
    assert os.path.isfile(hf_dir / "model.safetensors.index.json")
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in default_corpus(200, seed=5)))
    data_dir = f"gs://{BUCKET}/open-web-math"  # parquet in the bucket, read by both processes
    problems = tmp_path / "gsm8k.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in arithmetic_problems(2, seed=9)))

    with running_emulator(BUCKET, str(tmp_path)) as env:
        _cli("qstar_jax.convert", ["--hf-checkpoint", str(hf_dir), "--output", f"gs://{BUCKET}/{MODEL}"], env, cwd,
             devices=1)
        _cli("qstar_jax.data", ["--to-parquet", str(corpus), "--output", data_dir], env, cwd, devices=1)
        with Pod(env, cwd, logs, data_dir, steps=400) as pod:
            deadline = time.time() + 300
            while not any(n.startswith(f"{RUN}/checkpoints/2/") for n in object_names(env, BUCKET, RUN + "/checkpoints")):
                assert pod.alive(), pod.stderr(0) + pod.stderr(1)
                assert time.time() < deadline, "no checkpoint reached the bucket\n" + pod.stderr(0)
                time.sleep(0.5)
            pod.procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host
            stopped = {int(line.split()[-2].rstrip(","))
                       for out in pod.finish() for line in out.splitlines() if line.startswith("preempted: saved")}
        assert len(stopped) == 1, stopped  # both processes saved the same step
        step = stopped.pop()
        assert 2 <= step < 400

        delete_prefix(env, BUCKET, MODEL)  # a resumed run must not need init_from
        with Pod(env, cwd, logs, data_dir, steps=step + 2) as pod:
            resumed = pod.finish()
        assert f"resumed from step {step}" in resumed[0]
        assert f"step {step + 2}/{step + 2}" in resumed[0]

        workdir = f"gs://{BUCKET}/{RUN}"
        gate = ["--think-gate", "0"]  # think where the gate predicts any gain
        scores = json.loads(_cli("qstar_jax.evaluate", ["--checkpoint", workdir, "--task", "gsm8k", "--data",
                                                        str(problems), *gate], env, cwd).stdout.strip().splitlines()[-1])
        assert scores["examples"] == 2 and 0.0 < scores["soft_score"] <= 1.0
        assert scores["think_gate"] == 0 and 0 <= scores["thoughts_per_token"] <= 1
        generated = _cli("qstar_jax.generate", ["--checkpoint", workdir, "--prompt", "Ava has 3 apples.",
                                                "--max-new-tokens", "4", *gate], env, cwd)
        assert generated.stdout.strip() and "thoughts per generated token:" in generated.stderr

        names = object_names(env, BUCKET, RUN)
        for expected in ("metrics.jsonl", "model_config.json", "tokenizer/tokenizer.json", "tensorboard/",
                         f"checkpoints/{step + 2}/"):
            assert any(n.startswith(f"{RUN}/{expected}") for n in names), (expected, names[:20])
        assert f"{RUN}/run.lock" not in names  # released at the end of the run
        # Each checkpoint's manifest records the bucket's own CRC32C of every object; an object
        # rewritten afterwards (here: 64 bytes flipped) no longer matches it.
        newest = f"{RUN}/checkpoints/{step + 2}"
        recorded = json.loads(_read(env, f"{newest}/manifest.json"))["files"]
        assert recorded and all(entry["checksum"].startswith("crc32c:") for entry in recorded.values())
        state_objects = [n for n in names if n.startswith(f"{newest}/state/")]
        victim = max(state_objects, key=lambda n: recorded[n[len(newest) + 1:]]["bytes"])
        _upload(env, victim, bytes(b ^ 0xFF if i < 64 else b for i, b in enumerate(_read(env, victim))))
        check = "from qstar_jax.training import manifest; import sys; print(manifest.verify_step(manifest.paths.path(sys.argv[1])))"
        result = subprocess.run([sys.executable, "-c", check, f"gs://{BUCKET}/{newest}"], cwd=cwd, env=_env(env, 1),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        verdict = result.stdout.strip().splitlines()[-1]
        assert verdict.startswith(victim[len(newest) + 1:] + " does not match its checksum (crc32c:"), verdict
        logged = [json.loads(line) for line in _read(env, f"{RUN}/metrics.jsonl").decode().splitlines()]
        assert max(m["step"] for m in logged) == step + 2
        assert all("think_gate_loss" in m for m in logged if "loss" in m)  # the gate trained throughout
        assert _tensorboard_losses(env, tmp_path / "tensorboard") == {m["step"]: m["loss"] for m in logged if "loss" in m}
    assert not os.path.exists(cwd / "gs:") and os.listdir(cwd) == []


def _tensorboard_losses(env: dict, local_dir) -> dict[int, float]:
    """The loss scalars of the run's event files in the bucket (one per start), as
    TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local_dir.mkdir()
    for name in object_names(env, BUCKET, f"{RUN}/tensorboard/"):
        (local_dir / os.path.basename(name)).write_bytes(_read(env, name))
    accumulator = EventAccumulator(str(local_dir))
    accumulator.Reload()
    return {e.step: pytest.approx(e.value, rel=1e-6) for e in accumulator.Scalars("loss")}


def _upload(env: dict, name: str, data: bytes) -> None:
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{env['STORAGE_EMULATOR_HOST']}/upload/storage/v1/b/{BUCKET}/o?{query}",
                                     data=data, method="POST")
    urllib.request.urlopen(request).close()


def _read(env: dict, name: str) -> bytes:
    import urllib.parse
    import urllib.request

    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
        return r.read()
