"""Data sources (default corpus, files, tfds) and deterministic windows."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from qstar_jax import data
from qstar_jax.errors import UserError


def config(**kw):
    base = dict(source="files", path="", tfds_name="", split="train", text_field="text", max_documents=0,
                default_documents=50, default_seed=0)
    return ml_collections.ConfigDict({**base, **kw})


def test_default_corpus_is_deterministic():
    assert data.default_corpus(20, seed=3) == data.default_corpus(20, seed=3)
    assert data.default_corpus(20, seed=3) != data.default_corpus(20, seed=4)


def test_file_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    docs = data.load_documents(config(path=str(tmp_path)))
    assert docs == ["plain text document", "json one", "json two", "parquet row"]
    assert data.load_documents(config(path=str(tmp_path), max_documents=2)) == docs[:2]


def test_bad_data_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="data path does not exist"):
        data.load_documents(config(path=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no .txt/.jsonl/.parquet files"):
        data.load_documents(config(path=str(tmp_path)))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(UserError, match="x.jsonl:1 has no 'text' field"):
        data.load_documents(config(path=str(tmp_path)))
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(UserError, match="the files dataset is empty"):
        data.load_documents(config(path=str(tmp_path)))


def test_tfds_source(tmp_path):
    from tfds_local import TinyText, prepare

    prepare(TinyText, str(tmp_path))
    docs = data.load_documents(config(source="tfds", tfds_name="tiny_text", path=str(tmp_path)))
    assert sorted(docs) == sorted(f"Document {i}: {i} plus {i} is {2 * i}." for i in range(12))
    with pytest.raises(UserError, match="not available"):
        data.load_documents(config(source="tfds", tfds_name="tiny_text", path=str(tmp_path / "none")))


def test_windows_are_a_pure_function_of_step_and_row():
    sampler = data.WindowSampler(np.arange(1000, dtype=np.int32), seq_len=16, seed=0)
    a, valid = sampler.batch(5, [0, 1, 2])
    assert a.shape == (3, 16) and valid.all()
    np.testing.assert_array_equal(a, sampler.batch(5, [0, 1, 2])[0])
    np.testing.assert_array_equal(a[1:], sampler.batch(5, [1, 2])[0])  # rows are independent
    assert not np.array_equal(a, sampler.batch(6, [0, 1, 2])[0])
    assert all(np.array_equal(row, np.arange(row[0], row[0] + 16)) for row in a)  # contiguous crops
    with pytest.raises(UserError, match="fewer than one window"):
        data.WindowSampler(np.arange(10, dtype=np.int32), seq_len=16, seed=0)


def test_held_out_problems_are_gsm8k_records(tmp_path):
    from qstar_jax.tasks import load_examples

    path = tmp_path / "problems.jsonl"
    data.main(["--write-problems", str(path), "--count", "20", "--seed", "7"])
    examples = load_examples("gsm8k", str(path))
    assert len(examples) == 20
    for example, problem in zip(examples, data.arithmetic_problems(20, seed=7)):
        assert example.prompt == f"Q: {problem['question']}\nA:"
        assert f"is {example.answer}, so the answer is {example.answer}." in problem["answer"]
    assert data.arithmetic_problems(20, seed=7) != data.arithmetic_problems(20, seed=0)
    assert all(text.endswith(".") and "so the answer is" in text for text in data.default_corpus(10))
