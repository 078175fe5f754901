"""Any name a file system or bucket accepts works as a workdir, model directory or data path.

`[`, `]`, `*`, `?` are legal in file and object names but are glob syntax to etils (which
Orbax lists checkpoints through) and to gcsfs (which globs the path of every bucket `rm`
and `mv`); before qstar_jax/paths.py matched names literally, training below such a name
exited 0 and left checkpoints that could never be read again. Each test runs the real
path once: a local run, its resume, generate and evaluate; a converted model directory;
the same run on a bucket (fake-gcs-server); Orbax's checkpoints there; and the names
Orbax's storage cannot hold (a local `\\`, control characters on a bucket), refused in
one line before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gcs_emulator import emulator_in_this_process, object_names
from test_tasks import RECORDS, write_jsonl
from test_train import REPO, assert_ok, run_train

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.training import checkpoint
from qstar_jax.training.corpora import default_corpus

# Glob syntax, URL syntax (`?`, `#`, `%`, `:` and a `://` inside a local path), spaces,
# shell and JSON quoting, non-ASCII.
LOCAL_NAME = "odd [0]*?#% :é,{x}!'"
BUCKET_NAME = LOCAL_NAME  # "?" and "#" too: gcsfs would read them as a generation where a path is parsed
ORBAX_ODD_NAME = "odd [0]*?#% :é"
BUCKET = "odd-paths"
RUN_STEPS = ["--config.steps=2", "--config.checkpoint_every=1", "--config.eval_every=0",
             "--config.optimizer.total_steps=3"]


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"qstar_jax.{module}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})


def steps_of(ckpt_dir: str) -> list[int]:
    reader = checkpoint.CheckpointReader(ckpt_dir)
    try:
        return reader.steps()
    finally:
        reader.close()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """SMALL's run on its corpus read from an odd data directory, in an odd workdir (with
    `://` inside): 2 steps, then resumed for a third (the shapes of test_train's runs)."""
    root = tmp_path_factory.mktemp("odd") / LOCAL_NAME
    data_dir = root / "data [1]*?"
    (data_dir / "part [2]?#").mkdir(parents=True)
    write_jsonl(data_dir / "part [2]?#" / "corpus.jsonl", [{"text": t} for t in default_corpus(300)])
    workdir = f"{root}/w://run"
    data_flags = ["--config.data.source=files", f"--config.data.path={data_dir}"]
    first = run_train(workdir, *RUN_STEPS, *data_flags)
    resumed = run_train(workdir, *RUN_STEPS, *data_flags, "--config.steps=3")
    return root, workdir, first, resumed


def test_local_odd_workdir_trains_resumes_and_is_read_back(local_run):
    root, workdir, first, resumed = local_run
    assert_ok(first)
    assert_ok(resumed)
    assert "resumed from step 2" in resumed.stdout and "step 3/3" in resumed.stdout, resumed.stdout[-2000:]
    assert "moved to" not in resumed.stdout + resumed.stderr  # no step was taken for corrupt
    ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINTS_DIR)
    assert steps_of(ckpt_dir) == [1, 2, 3]
    reader = checkpoint.open_run(workdir)
    assert [reader.verify(step) for step in (1, 2, 3)] == [None, None, None]
    reader.close()
    assert not os.path.exists(os.path.join(workdir, checkpoint.CORRUPT_DIR))
    assert "data: 280 training documents" in first.stdout

    generated = cli("generate", "--checkpoint", workdir, "--prompt", "Ava has 3 apples.", "--max-new-tokens", 4)
    assert generated.returncode == 0, generated.stderr[-3000:]
    tasks = write_jsonl(root / "csqa [3]?.jsonl", [RECORDS["csqa"]] * 2)
    evaluated = cli("evaluate", "--checkpoint", workdir, "--task", "csqa", "--data", tasks, "--no-think",
                    "--output", root / "results [4]*.json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((root / "results [4]*.json").read_text())["examples"] == 2


def test_model_directory_converted_into_an_odd_path_reads_back(tmp_path):
    """HF checkpoint -> model directory -> HF checkpoint, every directory named oddly."""
    from hf_models import make_tiny_hf_model, torch_logits
    from qstar_jax.models import convert, model_files
    from qstar_jax.models.transformer import apply_lm

    root = tmp_path / LOCAL_NAME
    hf_dir, model_dir, back_dir = (str(root / name) for name in ("hf [5]?", "model [6]*?", "back [7]#"))
    torch_model = make_tiny_hf_model("llama_tied", hf_dir)
    convert.main(["--hf-checkpoint", hf_dir, "--output", model_dir])
    config, params = model_files.load_model(model_dir)
    tokens = np.arange(10)[None] % 97
    assert np.abs(np.asarray(apply_lm(config, params, tokens)) - torch_logits(torch_model, tokens)).max() <= 1e-4
    convert.main(["--to-hf", "--checkpoint", model_dir, "--output", back_dir])
    assert os.path.isfile(os.path.join(back_dir, "config.json"))


@pytest.fixture()
def bucket_env(tmp_path, monkeypatch):
    """fake-gcs-server for this test, in this process's environment and its subprocesses'."""
    with emulator_in_this_process(BUCKET, str(tmp_path), monkeypatch) as env:
        yield env


def test_bucket_odd_workdir_trains_resumes_and_generates(bucket_env):
    """Keeping one checkpoint, each save deletes the step before it (a bucket `rm`)."""
    workdir = f"gs://{BUCKET}/{BUCKET_NAME}/run"
    keep_one = ["--config.keep_checkpoints=1"]
    assert_ok(run_train(workdir, *RUN_STEPS, *keep_one))
    resumed = run_train(workdir, *RUN_STEPS, *keep_one, "--config.steps=3")
    assert_ok(resumed)
    assert "resumed from step 2" in resumed.stdout and "step 3/3" in resumed.stdout, resumed.stdout[-2000:]
    names = object_names(bucket_env, BUCKET, f"{BUCKET_NAME}/run/")
    assert {n.split("/")[3] for n in names if "/checkpoints/" in n} == {"3"}
    assert not any(checkpoint.CORRUPT_DIR in n for n in names)
    generated = cli("generate", "--checkpoint", workdir, "--prompt", "Ava has 3 apples.", "--max-new-tokens", 4)
    assert generated.returncode == 0, generated.stderr[-3000:]


@pytest.mark.parametrize("name", [ORBAX_ODD_NAME, "plain"])
def test_bucket_checkpoints_save_restore_delete_and_move_aside(bucket_env, name):
    """Orbax's part of a run on a bucket, `?` and `#` included: saves that delete the step
    before, a verified restore, a step moved aside (a bucket `mv`, into a folder that does
    not exist yet: also new for a plain name) and a later save."""
    directory = f"gs://{BUCKET}/{name}/run/{checkpoint.CHECKPOINTS_DIR}"
    ckpt = checkpoint.TrainCheckpoints(directory, keep=1, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((4,), float(step))}, {"next_step": step}, {"m": step})
    ckpt.wait()
    assert ckpt.steps() == [2] and ckpt.verify(2) is None
    state, data_state = ckpt.restore(2, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert np.array_equal(state["w"], np.full((4,), 2.0)) and data_state == {"next_step": 2}
    aside = ckpt.set_aside(2)
    assert ckpt.steps() == [] and aside == f"gs://{BUCKET}/{name}/run/{checkpoint.CORRUPT_DIR}/2"
    assert (paths.path(aside) / "manifest.json").is_file()
    ckpt.save(3, {"w": jnp.full((4,), 3.0)}, {"next_step": 3}, {"m": 3})
    ckpt.close()
    names = object_names(bucket_env, BUCKET, f"{name}/run/")
    assert {n.split("/")[3] for n in names if f"/{checkpoint.CHECKPOINTS_DIR}/" in n} == {"3"}
    assert steps_of(directory) == [3]


@pytest.mark.parametrize("directory, character", [("{tmp}/a\\b/checkpoints", "'\\\\'"),
                                                  ("gs://bucket/a\tb/checkpoints", "'\\t'"),
                                                  ("gs://bucket/a\nb/checkpoints", "'\\n'")])
def test_a_name_orbax_cannot_store_is_refused_before_anything_is_written(tmp_path, directory, character):
    """Tensorstore reads a local `\\` as a directory separator and refuses control
    characters in object names (Orbax's URL parsing drops tabs and newlines before): the
    checkpoints would land elsewhere or not at all, so the name is refused in one line."""
    directory = directory.format(tmp=tmp_path)
    with pytest.raises(UserError) as refused:
        checkpoint.TrainCheckpoints(directory, keep=1)
    message = str(refused.value)
    assert "\n" not in message and f"the character {character} in " in message, message
    assert os.listdir(tmp_path) == []


def test_train_refuses_such_a_workdir_before_taking_its_lock(tmp_path):
    from experiments import tiny_cpu
    from qstar_jax.training import trainer

    with pytest.raises(UserError, match=re.escape("the character '\\\\' in ")):
        trainer.train(tiny_cpu.get_config(), str(tmp_path / "a\\b"))
    assert os.listdir(tmp_path) == []
