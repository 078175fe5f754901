"""Data sources (default corpus, files, OpenWebMath/C4 layouts, tfds) and deterministic rows."""

from __future__ import annotations

import gzip
import json

import ml_collections
import numpy as np
import pytest

from qstar_jax.data import main as data_main
from qstar_jax.training import data
from qstar_jax.training import corpora
from qstar_jax.errors import UserError
from qstar_jax.tokenizer import Tokenizer
from qstar_jax.toy.reasoning import document_question, split_of


def config(**kw):
    base = dict(source="files", path="", tfds_name="", split="train", text_field="text", max_documents=0,
                default_documents=50, default_seed=0)
    return ml_collections.ConfigDict({**base, **kw})


def test_default_corpus_is_deterministic():
    assert corpora.default_corpus(20, seed=3) == corpora.default_corpus(20, seed=3)
    assert corpora.default_corpus(20, seed=3) != corpora.default_corpus(20, seed=4)


def _all(dataset) -> list[str]:
    return [dataset[i] for i in range(len(dataset))]


def test_generated_sources_train_on_train_split_questions_only():
    default = _all(data.load_documents(config(source="default", default_documents=500, default_seed=2)))
    assert len(default) == 500 and {split_of(text.partition("?")[0] + "?") for text in default} == {"train"}
    toy = ml_collections.ConfigDict(dict(problems=1000, seed=3, explicit_fraction=0.5, num_ops=3,
                                         aside_fraction=0.2, delimiter_fraction=0.5))
    texts = _all(data.load_documents(config(source="toy_reasoning", toy=toy)))
    assert len(texts) == 1000 and {split_of(document_question(text)) for text in texts} == {"train"}


def test_file_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    docs = _all(data.load_documents(config(path=str(tmp_path))))
    assert docs == ["plain text document", "json one", "json two", "parquet row"]
    assert _all(data.load_documents(config(path=str(tmp_path), max_documents=2))) == docs[:2]


def _open_web_math(directory, documents: list[str], shards: int = 2, rows_per_group: int = 7):
    """OpenWebMath exactly as the HF hub ships it: data/train-0000i-of-0000n.parquet with
    url/text/date/metadata columns, several row groups per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (directory / "data").mkdir(parents=True)
    per_shard = -(-len(documents) // shards)
    for i in range(shards):
        texts = documents[i * per_shard : (i + 1) * per_shard]
        table = pa.table({"url": [f"https://example.org/{i}/{k}" for k in range(len(texts))], "text": texts,
                          "date": ["2023-01-01"] * len(texts), "metadata": ["{}"] * len(texts)})
        pq.write_table(table, directory / "data" / f"train-{i:05d}-of-{shards:05d}.parquet", row_group_size=rows_per_group)


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    documents = [f"Document {i} proves {i} + {i} = {2 * i}." for i in range(40)]
    _open_web_math(tmp_path / "owm", documents)
    reads = []
    original = data.ParquetDocuments._read_group_uncached
    monkeypatch.setattr(data.ParquetDocuments, "_read_group_uncached",
                        lambda self, group: reads.append((self.path.name, group)) or original(self, group))
    dataset = data.load_documents(config(path=str(tmp_path / "owm")))
    assert len(dataset) == 40 and reads == []  # opening reads footers only
    assert dataset[23] == documents[23]  # shard 1 (rows 20-39), its row group 0 (rows 20-26)
    assert reads == [("train-00001-of-00002.parquet", 0)]
    assert _all(dataset) == documents


def test_c4_json_gz_becomes_parquet(tmp_path):
    """C4 as the HF hub ships it (en/c4-train.0000i-of-01024.json.gz: text, timestamp, url)
    -> `python -m qstar_jax.data --to-parquet` -> the files source reads the same texts."""
    import gzip

    import pyarrow.parquet as pq

    (tmp_path / "c4-json" / "en").mkdir(parents=True)
    texts = [f"Web page {i}: shop {i} opens at {i % 12} am." for i in range(30)]
    for shard in range(2):
        with gzip.open(tmp_path / "c4-json" / "en" / f"c4-train.{shard:05d}-of-01024.json.gz", "wt") as f:
            for text in texts[shard * 15 : (shard + 1) * 15]:
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x.org"}) + "\n")
    data_main(["--to-parquet", str(tmp_path / "c4-json" / "en"), "--output", str(tmp_path / "c4")])
    written = sorted(p.name for p in (tmp_path / "c4").iterdir())
    assert written == ["c4-train.00000-of-01024.parquet", "c4-train.00001-of-01024.parquet"]
    assert pq.ParquetFile(tmp_path / "c4" / written[0]).metadata.num_rows == 15
    assert _all(data.load_documents(config(path=str(tmp_path / "c4")))) == texts


def _jsonl(path, texts, extra_line=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": text}) for text in texts] + ([extra_line] if extra_line else [])
    path.write_text("".join(line + "\n" for line in lines))


def _data_main_error(capsys, *argv) -> str:
    """The one stderr line of a refused `python -m qstar_jax.data` run (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        data_main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _tree(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_to_parquet_keeps_same_named_files_of_sub_folders_apart(tmp_path, capsys):
    """C4's en/ and realnewslike/ hold files of one name: each keeps its own output (the
    sub-folder mirrored), and every document reported written is there to read."""
    _jsonl(tmp_path / "c4" / "en" / "c4-train.00000.jsonl", ["en one", "en two"])
    _jsonl(tmp_path / "c4" / "realnewslike" / "c4-train.00000.jsonl", ["news one"])
    data_main(["--to-parquet", str(tmp_path / "c4"), "--output", str(tmp_path / "out")])
    assert "wrote 3 documents" in capsys.readouterr().out
    assert sorted(_tree(tmp_path / "out")) == ["en/c4-train.00000.parquet", "realnewslike/c4-train.00000.parquet"]
    assert _all(data.load_documents(config(path=str(tmp_path / "out")))) == ["en one", "en two", "news one"]

    # Two inputs one folder apart by suffix only would write one file: refused, naming both.
    with gzip.open(tmp_path / "c4" / "en" / "c4-train.00000.json.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped"}) + "\n")
    err = _data_main_error(capsys, "--to-parquet", str(tmp_path / "c4"), "--output", str(tmp_path / "out2"))
    assert "c4-train.00000.json.gz and " in err and "c4-train.00000.jsonl would both be written to" in err, err
    assert not (tmp_path / "out2").exists()


def test_to_parquet_stopped_by_a_bad_line_writes_nothing(tmp_path, capsys):
    """A bad line in the second file: neither the first file's output nor a partial second
    one is left (no parquet that looks whole, no temporary file, no new directory); with
    --overwrite into a directory of earlier outputs, those stay as they were."""
    _jsonl(tmp_path / "src" / "a.jsonl", [f"good {i}" for i in range(5)])
    _jsonl(tmp_path / "src" / "sub" / "b.jsonl", ["fine", "also fine"], extra_line='{"text": "cut sh')
    err = _data_main_error(capsys, "--to-parquet", str(tmp_path / "src"), "--output", str(tmp_path / "out"))
    assert "sub/b.jsonl:3 is not valid JSON" in err, err
    assert not (tmp_path / "out").exists()

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.parquet").write_bytes(b"an earlier output")
    (tmp_path / "old" / "notes.txt").write_text("not ours")
    before = _tree(tmp_path / "old")
    _data_main_error(capsys, "--to-parquet", str(tmp_path / "src"), "--output", str(tmp_path / "old"), "--overwrite")
    assert _tree(tmp_path / "old") == before and not (tmp_path / "old" / "sub").exists()

    _jsonl(tmp_path / "src" / "sub" / "b.jsonl", ["fine", "also fine"])
    data_main(["--to-parquet", str(tmp_path / "src"), "--output", str(tmp_path / "old"), "--overwrite"])
    assert sorted(_tree(tmp_path / "old")) == ["a.parquet", "notes.txt", "sub/b.parquet"]
    assert (tmp_path / "old" / "notes.txt").read_text() == "not ours"  # --overwrite replaces only what it writes
    assert _all(data.load_documents(config(path=str(tmp_path / "old" / "a.parquet")))) == [f"good {i}" for i in range(5)]


def test_outputs_are_replaced_only_with_overwrite(tmp_path, capsys):
    _jsonl(tmp_path / "src" / "a.jsonl", ["new text"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.parquet").write_bytes(b"an earlier output")
    err = _data_main_error(capsys, "--to-parquet", str(tmp_path / "src"), "--output", str(tmp_path / "out"))
    assert err == f"error: --output {tmp_path / 'out'} is not empty; pass --overwrite to replace the files written there"
    assert (tmp_path / "out" / "a.parquet").read_bytes() == b"an earlier output"

    problems = tmp_path / "problems.jsonl"
    problems.write_text("mine\n")
    err = _data_main_error(capsys, "--write-problems", str(problems), "--count", "3")
    assert err == f"error: {problems} exists; pass --overwrite to replace it"
    assert problems.read_text() == "mine\n"
    err = _data_main_error(capsys, "--write-problems", str(problems), "--count", "-3", "--overwrite")
    assert err == "error: --count must be >= 1, got -3"
    assert problems.read_text() == "mine\n"
    data_main(["--write-problems", str(problems), "--count", "3", "--overwrite"])
    assert len(problems.read_text().splitlines()) == 3

    with pytest.raises(SystemExit):
        data_main(["--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_bad_data_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="data path does not exist"):
        data.load_documents(config(path=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no .txt/.jsonl/.parquet files"):
        data.load_documents(config(path=str(tmp_path)))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(UserError, match="x.jsonl:1 has no 'text' text field"):
        data.load_documents(config(path=str(tmp_path)))
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(UserError, match="x.jsonl:2 is not UTF-8 text"):
        data.load_documents(config(path=str(tmp_path)))
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(UserError, match="the files dataset is empty"):
        data.load_documents(config(path=str(tmp_path)))
    (tmp_path / "x.jsonl").unlink()
    (tmp_path / "y.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="y.parquet is not a readable parquet file"):
        data.load_documents(config(path=str(tmp_path)))
    (tmp_path / "y.parquet").unlink()
    (tmp_path / "z.txt").write_bytes(b"caf\xe9 in Latin-1")
    documents = data.load_documents(config(path=str(tmp_path)))  # .txt files are read when a row needs them
    with pytest.raises(UserError, match=r"z.txt is not UTF-8 text \(byte 3: invalid continuation byte\)"):
        documents[0]
    with pytest.raises(UserError, match="--to-parquet source does not exist"):
        data_main.__wrapped__(["--to-parquet", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    with pytest.raises(UserError, match="--to-parquet needs --output"):
        data_main.__wrapped__(["--to-parquet", str(tmp_path)])


def test_tfds_source(tmp_path):
    from tfds_local import TinyText, prepare

    prepare(TinyText, str(tmp_path))
    docs = _all(data.load_documents(config(source="tfds", tfds_name="tiny_text", path=str(tmp_path))))
    assert sorted(docs) == sorted(f"Document {i}: {i} plus {i} is {2 * i}." for i in range(12))
    with pytest.raises(UserError, match="not available"):
        data.load_documents(config(source="tfds", tfds_name="tiny_text", path=str(tmp_path / "none")))


class CharTokenizer(Tokenizer):
    """One id per character (+BOS 1, EOS 2): rows can be checked against the texts by eye."""

    bos_id, eos_id = 1, 2

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def _rows(documents, packing, seq_len=16, seed=0):
    import grain

    return data.Rows(grain.MapDataset.source(documents), CharTokenizer(), seq_len, seed, packing)


def _encoded(text):
    return [1] + [ord(c) for c in text] + [2]


def test_one_document_per_row_cropped_or_padded():
    documents = ["short", "a much longer document than one row holds", "mid-size one"]
    rows = _rows(documents, packing=False)
    seen = set()
    for index in range(3):  # one epoch: every document once
        row = rows[index]
        real = row.tokens_N[row.segments_N > 0].tolist()
        source = next(d for d in documents if any(_encoded(d)[k : k + len(real)] == real for k in range(len(_encoded(d)))))
        seen.add(source)
        if len(_encoded(source)) <= 16:  # whole document, then EOS padding in segment 0
            assert real == _encoded(source)
            assert (row.tokens_N[len(real):] == 2).all() and (row.segments_N[len(real):] == 0).all()
        else:  # a contiguous crop filling the row
            assert len(real) == 16 and (row.segments_N == 1).all()
    assert seen == set(documents)
    np.testing.assert_array_equal(rows[1].tokens_N, _rows(documents, packing=False)[1].tokens_N)  # pure function
    assert not all(np.array_equal(rows[i].tokens_N, _rows(documents, False, seed=1)[i].tokens_N) for i in range(3))


def test_packed_rows_are_full_and_keep_documents_apart():
    documents = [f"doc{i}" for i in range(10)]  # 6 tokens each with BOS/EOS
    rows = _rows(documents, packing=True, seq_len=20)
    for index in range(12):
        row = rows[index]
        assert (row.segments_N > 0).all()  # no padding
        ids = np.unique(row.segments_N)
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # 1, 2, ... in order
        np.testing.assert_array_equal(np.sort(row.segments_N), row.segments_N)
        for segment in ids[1:]:  # every document after the first starts at its BOS
            piece = row.tokens_N[row.segments_N == segment].tolist()
            assert piece[0] == 1 and any(_encoded(d)[: len(piece)] == piece for d in documents)


def test_rows_read_only_their_own_documents():
    """A process builds only its rows: row i reads documents i, i+1, ... of the shuffled
    order and nothing else, so no process tokenises the corpus."""
    asked = []

    class Recording(list):
        def __getitem__(self, index):
            asked.append(index)
            return super().__getitem__(index)

    import grain

    rows = data.Rows(grain.MapDataset.source(Recording(f"text {i}" for i in range(1000))), CharTokenizer(), 8, 0,
                     packing=False)
    rows[123]
    assert len(asked) == 1


def test_held_out_problems_are_gsm8k_records(tmp_path):
    from qstar_jax.inference.tasks import load_examples

    path = tmp_path / "problems.jsonl"
    data_main(["--write-problems", str(path), "--count", "20", "--seed", "7"])
    examples = load_examples("gsm8k", str(path))
    assert len(examples) == 20
    for example, problem in zip(examples, corpora.arithmetic_problems(20, seed=7, split="test"), strict=True):
        assert example.prompt == f"Q: {problem['question']}\nA:"
        assert f"is {example.answer}, so the answer is {example.answer}." in problem["answer"]
        assert split_of(problem["question"]) == "test"  # held out: never in the training corpus
    assert corpora.arithmetic_problems(20, seed=7) != corpora.arithmetic_problems(20, seed=0)
    assert all(text.endswith(".") and "so the answer is" in text for text in corpora.default_corpus(10))


def test_held_out_problems_as_documents_read_like_the_corpus_and_feed_analyze(tmp_path):
    """`--as-documents`: the same test-split problems, rendered as the training corpus renders
    its own, in the {"text": ...} form analyze reads."""
    from qstar_jax.training.data import file_documents

    path = tmp_path / "heldout.jsonl"
    data_main(["--write-problems", str(path), "--count", "5", "--seed", "1", "--as-documents"])
    expected = [corpora.document(p) for p in corpora.arithmetic_problems(5, seed=1, split="test")]
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == expected
    assert list(file_documents(str(path), "text")) == expected
