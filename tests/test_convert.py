"""The convert CLI both ways, sharded HF checkpoints, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hf_models import make_tiny_hf_model, torch_logits
from qstar_jax import paths
from qstar_jax.models import model_files
from qstar_jax.models import convert
from qstar_jax.models import hf
from qstar_jax.errors import UserError
from qstar_jax.models.transformer import apply_lm
from qstar_jax.tokenizer import load_tokenizer
from tokenizers_local import train_bpe_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_convert_round_trip_with_tokenizer(tmp_path):
    import transformers

    hf_dir, model_dir, out_dir = (str(tmp_path / n) for n in ("hf", "model", "back"))
    torch_model = make_tiny_hf_model("qwen2_bias", hf_dir)
    train_bpe_json(hf_dir)
    convert.main(["--hf-checkpoint", hf_dir, "--output", model_dir])
    config, params = model_files.load_model(model_dir)
    assert model_files.load_model_tokenizer(model_dir).encode("cat sat") == load_tokenizer(hf_dir).encode("cat sat")
    tokens = np.arange(10)[None] % 97
    ref = torch_logits(torch_model, tokens)
    assert np.abs(np.asarray(apply_lm(config, params, tokens)) - ref).max() <= 1e-4

    convert.main(["--to-hf", "--checkpoint", model_dir, "--output", out_dir])
    assert os.path.isfile(os.path.join(out_dir, "tokenizer.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype="float32").eval()
    assert np.abs(torch_logits(reloaded, tokens) - ref).max() <= 1e-4


def test_convert_bfloat16_params(tmp_path):
    hf_dir, model_dir = str(tmp_path / "hf"), str(tmp_path / "model")
    make_tiny_hf_model("llama_tied", hf_dir)
    convert.main(["--hf-checkpoint", hf_dir, "--output", model_dir, "--dtype", "bfloat16"])
    config, params = model_files.load_model(model_dir)
    assert config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("bfloat16")}
    _, params32 = hf.load_hf_model(hf_dir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype("bfloat16")), params, params32)


def test_sharded_hf_checkpoint_loads(tmp_path):
    torch_model = make_tiny_hf_model("llama_untied", str(tmp_path / "single"))
    torch_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    _, single = hf.load_hf_model(str(tmp_path / "single"))
    _, sharded = hf.load_hf_model(str(tmp_path / "sharded"))
    jax.tree.map(np.testing.assert_array_equal, single, sharded)


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "qstar_jax.convert", *args],
            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
        )

    result = run("--hf-checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'} is not a Hugging Face checkpoint: config.json is missing"]

    result = run("--to-hf", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "is not a qstar_jax model directory" in result.stderr


def _truncate(path, keep):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep(len(data))])


def _change_one_layer(path, change):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = change(tensors["model.layers.1.mlp.up_proj.weight"])
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("damage,message", [
    ("config_cut", "config.json is not valid JSON (Unterminated string"),
    ("weights_cut", "model.safetensors is truncated: its header describes"),
    ("header_cut", "model.safetensors is not a readable safetensors file"),
    ("one_layer_shape", "tensor model.layers.1.mlp.up_proj.weight has shape (127, 64), expected (128, 64)"),
    ("one_layer_int8", "model.safetensors: tensor model.layers.1.mlp.up_proj.weight has dtype I8; "
                       "only floating-point weights (F64, F32, F16, BF16) are read"),
])
def test_damaged_hf_checkpoint_is_one_line(tmp_path, capsys, damage, message):
    """What an interrupted download, a hand-edited or a quantised checkpoint looks like: one
    line naming the file or the tensor (layer 1 only: the other layers are right), exit 2,
    no output. An integer tensor is refused, never cast to float."""
    make_tiny_hf_model("llama_untied", str(tmp_path / "hf"))  # intermediate 128, hidden 64
    weights, config = tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"
    {"config_cut": lambda: _truncate(config, lambda n: n // 2),
     "weights_cut": lambda: _truncate(weights, lambda n: n // 2),
     "header_cut": lambda: _truncate(weights, lambda n: 20),
     "one_layer_shape": lambda: _change_one_layer(weights, lambda w: w[:-1]),
     "one_layer_int8": lambda: _change_one_layer(weights, lambda w: (w * 100).astype(np.int8))}[damage]()
    capsys.readouterr()  # transformers' progress bars while saving the model
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--hf-checkpoint", str(tmp_path / "hf"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_wrong_architecture_params_are_refused(tmp_path):
    """A model dir whose params do not fit its config (e.g. copied from another model) fails clearly."""
    make_tiny_hf_model("llama_untied", str(tmp_path / "a"))
    make_tiny_hf_model("qwen2_bias", str(tmp_path / "b"))
    convert.main(["--hf-checkpoint", str(tmp_path / "a"), "--output", str(tmp_path / "ma")])
    convert.main(["--hf-checkpoint", str(tmp_path / "b"), "--output", str(tmp_path / "mb")])
    os.replace(tmp_path / "mb" / "model_config.json", tmp_path / "ma" / "model_config.json")
    with pytest.raises(UserError, match="do not match its model config"):
        model_files.load_model(str(tmp_path / "ma"))


def _convert_error(capsys, *argv) -> str:
    """The one stderr line of a refused conversion (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _files(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_existing_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    """Both directions refuse a non-empty --output; --overwrite replaces a model of the kind
    written, never another directory; no temporary directory is left beside the outputs."""
    hf_dir, model_dir, out_dir, notes = (tmp_path / n for n in ("hf", "model", "back", "notes"))
    make_tiny_hf_model("llama_tied", str(hf_dir))
    convert.main(["--hf-checkpoint", str(hf_dir), "--output", str(model_dir)])
    err = _convert_error(capsys, "--hf-checkpoint", str(hf_dir), "--output", str(model_dir), "--dtype", "bfloat16")
    assert err == f"error: {model_dir} is not empty; pass --overwrite to replace it"
    convert.main(["--hf-checkpoint", str(hf_dir), "--output", str(model_dir), "--dtype", "bfloat16", "--overwrite"])
    assert model_files.load_model_config(str(model_dir)).param_dtype == "bfloat16"

    convert.main(["--to-hf", "--checkpoint", str(model_dir), "--output", str(out_dir)])
    before = _files(out_dir)
    err = _convert_error(capsys, "--to-hf", "--checkpoint", str(model_dir), "--output", str(out_dir), "--dtype", "float32")
    assert err == f"error: {out_dir} is not empty; pass --overwrite to replace it"
    assert _files(out_dir) == before
    convert.main(["--to-hf", "--checkpoint", str(model_dir), "--output", str(out_dir), "--dtype", "float32", "--overwrite"])
    assert hf.read_hf_config(str(out_dir))["torch_dtype"] == "float32"

    notes.mkdir()
    (notes / "notes.txt").write_text("not a model")
    err = _convert_error(capsys, "--to-hf", "--checkpoint", str(model_dir), "--output", str(notes), "--overwrite")
    assert err == f"error: {notes} is not empty and is no Hugging Face checkpoint; --overwrite replaces only a Hugging Face checkpoint"
    err = _convert_error(capsys, "--hf-checkpoint", str(hf_dir), "--output", str(hf_dir), "--overwrite")
    assert "is no qstar_jax model directory" in err  # the checkpoint being read is not replaced
    assert _files(notes) == {"notes.txt": b"not a model"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "hf", "model", "notes"]


def _fail_after(items, count):
    for i, item in enumerate(items):
        if i == count:
            raise OSError("No space left on device")
        yield item


def test_failed_conversion_leaves_no_partial_output(tmp_path, monkeypatch):
    """A conversion stopped half-way (a full disk) leaves no model directory; one replacing an
    old model with --overwrite leaves the old one as it was."""
    hf_dir, model_dir, out_dir = (tmp_path / n for n in ("hf", "model", "back"))
    make_tiny_hf_model("llama_untied", str(hf_dir))
    convert.main(["--hf-checkpoint", str(hf_dir), "--output", str(model_dir)])
    before = _files(model_dir)
    hf_model_items = hf.hf_model_items
    monkeypatch.setattr(hf, "hf_model_items", lambda *a, **k: (lambda c, i: (c, _fail_after(i, 5)))(*hf_model_items(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        convert.main(["--hf-checkpoint", str(hf_dir), "--output", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(OSError, match="No space left"):
        convert.main(["--hf-checkpoint", str(hf_dir), "--output", str(model_dir), "--overwrite"])
    assert _files(model_dir) == before

    def fail(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(hf, "config_to_hf", fail)  # model.safetensors written, config.json not
    with pytest.raises(OSError, match="No space left"):
        convert.main(["--to-hf", "--checkpoint", str(model_dir), "--output", str(out_dir)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model"]


def test_bucket_outputs_are_refused_replaced_and_never_partial(tmp_path, monkeypatch, capsys):
    """gs:// outputs through the path layer (a GCS emulator) are written in place: refused
    when there, the file readers look for written last (so a conversion killed outright
    leaves no model), and one that fails, replacing an old one, leaves no object."""
    from gcs_emulator import emulator_in_this_process, object_names

    hf_dir = str(tmp_path / "hf")
    make_tiny_hf_model("llama_tied", hf_dir)
    train_bpe_json(hf_dir)
    written, write_bytes = [], paths.write_bytes
    monkeypatch.setattr(paths, "write_bytes", lambda p, data: written.append(paths.path(p).name) or write_bytes(p, data))
    with emulator_in_this_process("convert-test", str(tmp_path), monkeypatch) as env:
        model_dir, out_dir = "gs://convert-test/model", "gs://convert-test/hf"
        convert.main(["--hf-checkpoint", hf_dir, "--output", model_dir])
        assert "tokenizer.json" in written and written[-1] == model_files.MODEL_CONFIG_FILE
        err = _convert_error(capsys, "--hf-checkpoint", hf_dir, "--output", model_dir)
        assert err == f"error: {model_dir} is not empty; pass --overwrite to replace it"

        written.clear()
        convert.main(["--to-hf", "--checkpoint", model_dir, "--output", out_dir])
        assert {"tokenizer.json", "model.safetensors"} <= set(written) and written[-1] == "config.json"
        jax.tree.map(np.testing.assert_array_equal, hf.load_hf_model(out_dir)[1], hf.load_hf_model(hf_dir)[1])

        # --overwrite: the old checkpoint goes (its config.json first), then the failure
        # deletes what was written: nothing is left that a reader could take for a model.
        monkeypatch.setattr(hf, "config_to_hf", lambda *args: (_ for _ in ()).throw(OSError("No space left")))
        with pytest.raises(OSError, match="No space left"):
            convert.main(["--to-hf", "--checkpoint", model_dir, "--output", out_dir, "--overwrite"])
        assert object_names(env, "convert-test", "hf/") == []
