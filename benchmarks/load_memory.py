"""Host memory of weight loading and tokenisation speed, as JSON lines.

    python benchmarks/load_memory.py [--hidden 1536 --layers 12 --vocab 32000] [--workdir DIR] [--data-only]

Writes a random Llama-shaped HF checkpoint (bfloat16 safetensors shards, about 1 GB at the
defaults, written tensor by tensor), then measures in fresh processes:
  * `convert`: peak RSS of `python -m qstar_jax.convert` to a float32 model directory;
  * `load_8_devices`: peak RSS of one process restoring that model directory sharded over
    8 forced CPU devices in float32 (`model_files.load_model`, what `init_from` does), and
    of loading the HF directory itself the same way (`hf.load_hf_model`);
  * `data_rows`: training rows per second one process builds from OpenWebMath-shaped parquet
    shards (documents of ~2,300 tokens, row groups of 1,000, as the HF hub ships them):
    random document reads, tokenising (a byte-level BPE) and cropping, at seq_len 256.
RSS is the kernel's high-water mark of the process (VmHWM), baseline included; the baseline
(Python with the training program imported) is measured alone for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_hf_checkpoint(directory: str, hidden: int, layers: int, vocab: int, shard_bytes: int = 200 << 20) -> int:
    """A random Llama checkpoint, one tensor in memory at a time; returns its parameter count."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from qstar_jax.models.hf import config_to_hf
    from qstar_jax.models.config import ModelConfig

    heads = hidden // 128
    config = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=128)
    f = config.intermediate_size
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                   p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (f, hidden), p + "mlp.up_proj.weight": (f, hidden),
                   p + "mlp.down_proj.weight": (hidden, f)}
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        size += current[name].nbytes
        if size >= shard_bytes:
            shards.append(current)
            save_file(current, os.path.join(directory, f"shard-{len(shards):05d}.safetensors"))
            current, size = {}, 0
    if current:
        shards.append(current)
        save_file(current, os.path.join(directory, f"shard-{len(shards):05d}.safetensors"))
    weight_map = {}
    for index in range(1, len(shards) + 1):
        from qstar_jax.models.hf import SafetensorsFile

        file = f"shard-{index:05d}.safetensors"
        weight_map |= {name: file for name in SafetensorsFile(os.path.join(directory, file)).header}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"weight_map": weight_map}, fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config_to_hf(config, "bfloat16"), fh)
    return int(sum(np.prod(s) for s in shapes.values()))


def peak_rss_gb(code: str, devices: int = 1) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of `python -c code` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child would report
    # its parent's high-water mark; VmHWM belongs to the new address space.
    wrapper = code + "\nprint('RSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    kb = int([line for line in out.stdout.splitlines() if line.startswith("RSS")][-1].split()[1])
    return round(kb / 2**20, 3), round(wall, 1)


def data_rows(workdir: str, documents: int = 6000, seq_len: int = 256, rows: int = 200) -> dict:
    """Rows/s of `data.Rows` over parquet shards shaped like OpenWebMath's (what each
    process does per step for its own rows), and the tokens it tokenised per second."""
    import grain
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qstar_jax.training import data
    from qstar_jax.training import corpora
    from qstar_jax.tokenizer import train_bpe_tokenizer

    problems = corpora.default_corpus(documents * 4, seed=1)
    texts = [" ".join(problems[i * 4 : i * 4 + 4]) * 12 for i in range(documents)]  # ~9 KB each, like OWM
    directory = os.path.join(workdir, "owm", "data")
    os.makedirs(directory, exist_ok=True)
    shards = 3
    for i in range(shards):
        part = texts[i * documents // shards : (i + 1) * documents // shards]
        pq.write_table(pa.table({"url": ["u"] * len(part), "text": part}),
                       os.path.join(directory, f"train-{i:05d}-of-{shards:05d}.parquet"), row_group_size=1000)
    tokenizer = train_bpe_tokenizer(problems[:2000], 1000, os.path.join(workdir, "bpe"))
    source = data.file_documents(os.path.dirname(directory))
    training_rows = data.Rows(grain.MapDataset.source(source), tokenizer, seq_len, 0, packing=False)
    start = time.perf_counter()
    for index in range(rows):
        training_rows[index]
    seconds = time.perf_counter() - start
    encode_start = time.perf_counter()
    sample = [source[i] for i in range(50)]
    encoded_tokens = sum(len(tokenizer.encode(text)) for text in sample)
    encode_seconds = time.perf_counter() - encode_start
    return {"documents": documents, "seq_len": seq_len, "rows": rows, "rows_per_s_per_process": round(rows / seconds, 1),
            "mean_document_tokens": round(encoded_tokens / len(sample)),
            "tokenise_tokens_per_s_per_process": round(encoded_tokens / encode_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--data-only", action="store_true", help="only the data_rows measurement")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="load_memory_")
    if args.data_only:
        print(json.dumps({"data_rows": data_rows(workdir)}))
        return
    hf_dir, model_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "model")
    count = write_hf_checkpoint(hf_dir, args.hidden, args.layers, args.vocab)
    stored_gb = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)) / 2**30
    base = peak_rss_gb("import jax, qstar_jax.train")[0]
    convert = peak_rss_gb(f"from qstar_jax.models import convert; convert.main(['--hf-checkpoint', {hf_dir!r}, "
                          f"'--output', {model_dir!r}])")
    load = ("from qstar_jax.models import hf, model_files, sharding; mesh = sharding.make_mesh(1, 8, 1); "
            "import jax; assert jax.device_count() == 8; ")
    from_model = peak_rss_gb(load + f"model_files.load_model({model_dir!r}, mesh, 'float32')", devices=8)
    from_hf = peak_rss_gb(load + f"hf.load_hf_model({hf_dir!r}, 'float32', mesh)", devices=8)
    float32_gb = count * 4 / 2**30
    print(json.dumps({"params": count, "hf_bf16_gb": round(stored_gb, 3), "model_dir_float32_gb": round(float32_gb, 3),
                      "baseline_rss_gb": base,
                      "convert": {"peak_rss_gb": convert[0], "wall_s": convert[1],
                                  "bytes_per_param_over_baseline": round((convert[0] - base) * 2**30 / count, 2)},
                      "load_model_dir_8_devices": {"peak_rss_gb": from_model[0], "wall_s": from_model[1]},
                      "load_hf_dir_8_devices": {"peak_rss_gb": from_hf[0], "wall_s": from_hf[1]}}))

    print(json.dumps({"data_rows": data_rows(workdir)}))

if __name__ == "__main__":
    main()
