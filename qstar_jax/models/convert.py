"""Weight conversion CLI: Hugging Face checkpoint <-> qstar_jax model directory (Orbax).

    python -m qstar_jax.convert --hf-checkpoint HF_DIR --output MODEL_DIR [--dtype bfloat16]
    python -m qstar_jax.convert --to-hf --checkpoint MODEL_DIR --output HF_DIR [--dtype float32]
    python -m qstar_jax.convert --gguf FILE.gguf --output MODEL_DIR      (llama.cpp files, dequantised)

The tokenizer files travel along in both directions when present.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from qstar_jax import paths
from qstar_jax.models import model_files
from qstar_jax.models import hf
from qstar_jax.models.config import SUPPORTED_DTYPES
from qstar_jax.errors import exit_on_user_error
from qstar_jax.models.gguf import load_gguf_model, write_tokenizer
from qstar_jax.tokenizer import has_tokenizer, load_tokenizer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--hf-checkpoint", help="HF model directory to read (config.json + safetensors)")
    parser.add_argument("--gguf", help="llama-architecture GGUF file to read (dequantised)")
    parser.add_argument("--to-hf", action="store_true", help="export a qstar_jax model directory as HF")
    parser.add_argument("--checkpoint", help="qstar_jax model directory to read (with --to-hf)")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None, help="dtype of the written params")
    args = parser.parse_args(argv)
    if args.to_hf and not args.checkpoint:
        parser.error("--to-hf needs --checkpoint MODEL_DIR")
    if not args.to_hf and not (args.hf_checkpoint or args.gguf):
        parser.error("give --hf-checkpoint HF_DIR, --gguf FILE, or --to-hf --checkpoint MODEL_DIR")
    return args


def hf_to_model_dir(hf_dir: str, output: str, dtype: str | None) -> None:
    """Streams: one layer's tensor at a time is read, cast, written and dropped (host only)."""
    config, items = hf.hf_model_items(hf_dir, param_dtype=dtype or "float32")
    tokenizer = load_tokenizer(hf_dir) if has_tokenizer(hf_dir) else None
    model_files.save_model(output, config, items, tokenizer)
    print(f"wrote {config.model_type} model ({config.num_layers} layers, vocab {config.vocab_size}, "
          f"{config.param_dtype}) to {output}")


def gguf_to_model_dir(gguf_file: str, output: str, dtype: str | None) -> None:
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        config, params, reader = load_gguf_model(gguf_file, param_dtype=dtype or "float32")
        write_tokenizer(reader, tokenizer_dir)
        model_files.save_model(output, config, params, load_tokenizer(tokenizer_dir))
    print(f"wrote {config.model_type} model ({config.num_layers} layers, vocab {config.vocab_size}) from {gguf_file} "
          f"to {output}")


def model_dir_to_hf(model_dir: str, output: str, dtype: str | None) -> None:
    config, params = model_files.load_model(model_dir)
    hf.save_hf_model(config, params, output, dtype=dtype)
    tokenizer_dir = str(paths.path(model_dir) / model_files.TOKENIZER_DIR)
    if has_tokenizer(tokenizer_dir):
        load_tokenizer(tokenizer_dir).save(output)
    print(f"wrote Hugging Face {config.model_type} checkpoint to {output}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.to_hf:
        model_dir_to_hf(args.checkpoint, args.output, args.dtype)
    elif args.gguf:
        gguf_to_model_dir(args.gguf, args.output, args.dtype)
    else:
        hf_to_model_dir(args.hf_checkpoint, args.output, args.dtype)
