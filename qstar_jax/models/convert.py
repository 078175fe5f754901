"""Weight conversion CLI: Hugging Face checkpoint <-> qstar_jax model directory (Orbax).

    python -m qstar_jax.convert --hf-checkpoint HF_DIR --output MODEL_DIR [--dtype bfloat16]
    python -m qstar_jax.convert --to-hf --checkpoint MODEL_DIR --output HF_DIR [--dtype float32]
    python -m qstar_jax.convert --gguf FILE.gguf --output MODEL_DIR      (llama.cpp files, dequantised)

The tokenizer files travel along in both directions when present.

An existing non-empty --output is refused unless --overwrite is given, and even then only
a directory of the kind being written (a model directory, an HF checkpoint) is replaced.
Nothing half-written ever stands at --output: locally the conversion writes a temporary
sibling directory and renames it into place when it is complete. On a bucket (gs://),
where renaming a directory copies every object, it writes --output itself, with the file
the readers look for (model_config.json, config.json) last, and deletes it first when
replacing an old one; a failure deletes what was written, and a conversion killed outright
leaves objects that no reader takes for a model.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import uuid
from typing import Iterator

from qstar_jax import paths
from qstar_jax.models import model_files
from qstar_jax.models import hf
from qstar_jax.models.config import SUPPORTED_DTYPES
from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.models.gguf import load_gguf_model, write_tokenizer
from qstar_jax.tokenizer import has_tokenizer, load_tokenizer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--hf-checkpoint", help="HF model directory to read (config.json + safetensors)")
    parser.add_argument("--gguf", help="llama-architecture GGUF file to read (dequantised)")
    parser.add_argument("--to-hf", action="store_true", help="export a qstar_jax model directory as HF")
    parser.add_argument("--checkpoint", help="qstar_jax model directory to read (with --to-hf)")
    parser.add_argument("--output", required=True, help="directory to write; refused if it is not empty, "
                        "unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that holds a model of the kind written")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None, help="dtype of the written params")
    args = parser.parse_args(argv)
    if args.to_hf and not args.checkpoint:
        parser.error("--to-hf needs --checkpoint MODEL_DIR")
    if not args.to_hf and not (args.hf_checkpoint or args.gguf):
        parser.error("give --hf-checkpoint HF_DIR, --gguf FILE, or --to-hf --checkpoint MODEL_DIR")
    return args


# The names each direction writes, the first the one its readers look for: written last,
# deleted first, and what --overwrite requires an existing output to hold one of.
MODEL_DIR_NAMES = (model_files.MODEL_CONFIG_FILE, model_files.PARAMS_DIR)
HF_NAMES = ("config.json", "model.safetensors", "model.safetensors.index.json")


@contextlib.contextmanager
def output_directory(output: str, overwrite: bool, names: tuple[str, ...], what: str) -> Iterator[str]:
    """The directory to write a conversion into; `output` holds it only once it is whole.

    An existing non-empty `output` is refused without `overwrite`, and with it unless it
    holds one of `names` (a converter replaces its own kind of output, never, say, a home
    directory). Locally the body writes a temporary sibling, renamed into place when it
    completes (the old directory moved aside, then deleted) and deleted when it fails.
    On a bucket the body writes `output` itself (see the module docstring).
    """
    target = paths.path(paths.absolute(output))  # a name and a parent even for "."
    if target.is_file():
        raise UserError(f"--output must be a directory; {output} is a file")
    existing = target.is_dir() and any(target.iterdir())
    if existing and not overwrite:
        raise UserError(f"{output} is not empty; pass --overwrite to replace it")
    if existing and not any((target / name).exists() for name in names):
        raise UserError(f"{output} is not empty and is no {what}; --overwrite replaces only a {what}")
    if paths.is_remote(target):
        if existing:
            (target / names[0]).unlink(missing_ok=True)  # no longer a model to any reader, then gone
            target.rmtree()
        try:
            yield str(target)
        except BaseException:
            if target.exists():
                target.rmtree()
            raise
        return
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        yield str(staging)
    except BaseException:
        if staging.exists():
            staging.rmtree()
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        target.rename(old)
        staging.rename(target)
        old.rmtree()
    else:
        staging.rename(target)


def hf_to_model_dir(hf_dir: str, output: str, dtype: str | None, overwrite: bool) -> None:
    """Streams: one layer's tensor at a time is read, cast, written and dropped (host only)."""
    with output_directory(output, overwrite, MODEL_DIR_NAMES, "qstar_jax model directory") as directory:
        config, items = hf.hf_model_items(hf_dir, param_dtype=dtype or "float32")
        tokenizer = load_tokenizer(hf_dir) if has_tokenizer(hf_dir) else None
        model_files.save_model(directory, config, items, tokenizer)
    print(f"wrote {config.model_type} model ({config.num_layers} layers, vocab {config.vocab_size}, "
          f"{config.param_dtype}) to {output}")


def gguf_to_model_dir(gguf_file: str, output: str, dtype: str | None, overwrite: bool) -> None:
    with (output_directory(output, overwrite, MODEL_DIR_NAMES, "qstar_jax model directory") as directory,
          tempfile.TemporaryDirectory() as tokenizer_dir):
        config, params, reader = load_gguf_model(gguf_file, param_dtype=dtype or "float32")
        write_tokenizer(reader, tokenizer_dir)
        model_files.save_model(directory, config, params, load_tokenizer(tokenizer_dir))
    print(f"wrote {config.model_type} model ({config.num_layers} layers, vocab {config.vocab_size}) from {gguf_file} "
          f"to {output}")


def model_dir_to_hf(model_dir: str, output: str, dtype: str | None, overwrite: bool) -> None:
    with output_directory(output, overwrite, HF_NAMES, "Hugging Face checkpoint") as directory:
        config, params = model_files.load_model(model_dir)
        tokenizer_dir = str(paths.path(model_dir) / model_files.TOKENIZER_DIR)
        if has_tokenizer(tokenizer_dir):
            load_tokenizer(tokenizer_dir).save(directory)
        hf.save_hf_model(config, params, directory, dtype=dtype)  # config.json last
    print(f"wrote Hugging Face {config.model_type} checkpoint to {output}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.to_hf:
        model_dir_to_hf(args.checkpoint, args.output, args.dtype, args.overwrite)
    elif args.gguf:
        gguf_to_model_dir(args.gguf, args.output, args.dtype, args.overwrite)
    else:
        hf_to_model_dir(args.hf_checkpoint, args.output, args.dtype, args.overwrite)
