"""Task formats, prompt construction, answer extraction, soft score and the CoT vote."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.errors import UserError
from qstar_jax.tokenizer import Tokenizer
from qstar_jax.inference.evaluate import Evaluator, evaluate, majority_vote
from qstar_jax.models.transformer import apply_lm
from qstar_jax.inference.tasks import extract_number, load_examples

RECORDS = {
    "gsm8k": {"question": "Tom has 3 cats and gets 4 more. How many?", "answer": "3+4=<<3+4=7>>7\n#### 1,007"},
    "csqa": {"question": {"stem": "Where do fish live?", "choices": [
        {"label": "B", "text": "trees"}, {"label": "A", "text": "water"}, {"label": "C", "text": "sky"},
        {"label": "D", "text": "sand"}, {"label": "E", "text": "desk"}]}, "answerKey": "A"},
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
    "siqa": {"context": "Kim helped Lee.", "question": "How does Lee feel?", "answerA": "angry",
             "answerB": "grateful", "answerC": "sleepy", "label": "2"},
}
PROMPTS = {
    "gsm8k": ("Q: Tom has 3 cats and gets 4 more. How many?\nA:", "1007"),
    "csqa": ("Q: Where do fish live?\n(A) water\n(B) trees\n(C) sky\n(D) sand\n(E) desk\nA:", "A"),
    "piqa": ("Q: Open a jar\n(A) twist the lid\n(B) eat the lid\nA:", "A"),
    "siqa": ("Q: Kim helped Lee. How does Lee feel?\n(A) angry\n(B) grateful\n(C) sleepy\nA:", "B"),
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_prompts_and_answers(task, tmp_path):
    examples = load_examples(task, write_jsonl(tmp_path / "d.jsonl", [RECORDS[task]] * 3), limit=2)
    assert len(examples) == 2
    assert (examples[0].prompt, examples[0].answer) == PROMPTS[task]


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_bad_files_are_one_clear_error(task, tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load_examples(task, str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="no examples"):
        load_examples(task, write_jsonl(tmp_path / "empty.jsonl", []))
    broken = {k: v for k, v in RECORDS[task].items() if k not in ("answer", "answerKey", "label")}
    with pytest.raises(UserError, match=f"d.jsonl:1 is not in the {task} format"):
        load_examples(task, write_jsonl(tmp_path / "d.jsonl", [broken]))
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(RECORDS[task]).encode() + b"\n\xe9\n")
    with pytest.raises(UserError, match="latin1.jsonl:2 is not UTF-8 text"):
        load_examples(task, str(tmp_path / "latin1.jsonl"))


def test_extract_number_and_vote():
    assert extract_number(" the answer is 1,234 apples, not 5") == "1234"
    assert extract_number("-12.0 degrees") == "-12"
    assert extract_number("no digits") is None
    assert majority_vote([" 7.", "I think 9", "7 apples", "none", " 9", "7"]) == "7"
    assert majority_vote(["x", "y"]) is None


class CharTokenizer(Tokenizer):
    """One id per character: the hand computation below needs exact token boundaries."""

    bos_id, eos_id, pad_id = None, 0, 0
    chars = "\0 abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:?()\n#+=<>-'"

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def test_soft_score_equals_hand_computation_from_logits(tmp_path):
    from test_quiet_star import make_params
    from qstar_jax.models.config import ModelConfig
    from qstar_jax.method.config import QuietStarConfig

    tok = CharTokenizer()
    vocab = tok.vocab_size + 2
    config = ModelConfig("llama", vocab, 32, 64, 2, 4, 2, 8)
    qs = QuietStarConfig(n_ahead=4, start_token_id=vocab - 2, end_token_id=vocab - 1)
    params = make_params(config, qs)
    examples = load_examples("piqa", write_jsonl(tmp_path / "p.jsonl", [RECORDS["piqa"]]))
    result = evaluate(Evaluator(config, qs, params, tok, False), "piqa", examples)
    logp = []
    for letter in "AB":
        ids = tok.encode(examples[0].prompt + " " + letter)
        logits = apply_lm(config, params["lm"], jnp.asarray([ids]))[0]
        lp = jax.nn.log_softmax(logits, -1)
        n = len(tok.encode(examples[0].prompt))
        logp.append(float(lp[n - 1, ids[n]] + lp[n, ids[n + 1]]))  # " " then the letter
    expected = np.exp(logp[0] - np.logaddexp(*logp))
    assert result["soft_score"] == pytest.approx(expected, abs=1e-5)
    assert result["accuracy"] == float(logp[0] > logp[1])
    thinking = evaluate(Evaluator(config, qs, params, tok, True), "piqa", examples)
    assert 0 < thinking["soft_score"] < 1 and thinking["soft_score"] != pytest.approx(expected, abs=1e-6)


def test_tfds_task_source(tmp_path):
    from tfds_local import TinyPiqa, prepare

    prepare(TinyPiqa, str(tmp_path))
    examples = load_examples("piqa", "tfds:tiny_piqa/validation", data_dir=str(tmp_path))
    by_goal = {e.prompt.split("\n")[0]: e for e in examples}  # tfds stores records in hashed order
    assert {g: e.answer for g, e in by_goal.items()} == {"Q: Goal 0": "A", "Q: Goal 1": "B", "Q: Goal 2": "A"}
    assert by_goal["Q: Goal 1"].prompt == "Q: Goal 1\n(A) do it\n(B) do not\nA:"
    with pytest.raises(UserError, match="is not prepared"):
        load_examples("piqa", "tfds:tiny_piqa/validation", data_dir=str(tmp_path / "elsewhere"))


BAD_VALUES = [  # (task, fields replaced in a good record, what the one-line error says about it)
    ("piqa", {"label": -1}, "label must be an int from 0 to 1, got -1 (an unlabelled row, as test splits have"),
    ("piqa", {"label": 2}, "label must be an int from 0 to 1, got 2"),
    ("piqa", {"label": "1"}, "label must be an int from 0 to 1, got '1'"),
    ("piqa", {"label": 1.0}, "label must be an int from 0 to 1, got 1.0"),
    ("piqa", {"label": True}, "label must be an int from 0 to 1, got True"),
    ("piqa", {"goal": None}, "goal must be text, got None"),
    ("siqa", {"label": 2}, 'label must be the text "1", "2", "3" (1-based), got 2'),
    ("siqa", {"label": "0"}, 'label must be the text "1", "2", "3" (1-based), got \'0\''),
    ("siqa", {"label": "-1"}, "got '-1' (an unlabelled row"),
    ("csqa", {"answerKey": ""}, "answerKey must be one of the choice labels A, B, C, D, E, got '' (an unlabelled row"),
    ("csqa", {"answerKey": 0}, "answerKey must be one of the choice labels A, B, C, D, E, got 0"),
    ("csqa", {"question": {"stem": "?", "choices": [{"label": "A", "text": "x"}, {"label": "A", "text": "y"}]}},
     "choice labels must be distinct letters, got ['A', 'A']"),
    ("csqa", {"question": {"stem": "?", "choices": [{"label": c, "text": c} for c in "ABCDEF"]}},
     "6 choices; the prompt letters 2 to 5"),
    ("gsm8k", {"answer": 42}, "answer must be text, got 42"),
    ("gsm8k", {"answer": "7"}, "answer has no '#### N'"),
]


@pytest.mark.parametrize("task,fields,message", BAD_VALUES)
def test_a_label_of_the_wrong_type_or_range_is_refused_naming_file_and_line(task, fields, message, tmp_path):
    """Before, int(-1) picked the last choice (Python's negative indexing), int("1"), 1.0 and
    True were converted, SIQA's "0" meant the last answer: unscoreable rows got scored."""
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[task], {**RECORDS[task], **fields}])
    with pytest.raises(UserError) as error:
        load_examples(task, path)
    prefix = f"{path}:2 is not in the {task} format: "
    assert str(error.value).startswith(prefix) and message in str(error.value), str(error.value)


def test_a_negative_limit_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"the example limit must be >= 0 \(0 = all\), got -1"):
        load_examples("piqa", write_jsonl(tmp_path / "d.jsonl", [RECORDS["piqa"]] * 3), limit=-1)


def test_tfds_rows_without_a_label_are_refused(tmp_path):
    """tfds marks an unlabelled row (a test split) with ClassLabel -1; it names the row."""
    from tfds_local import TinyPiqa, prepare

    class UnlabelledPiqa(TinyPiqa):
        def _split_generators(self, dl_manager):
            return {"test": self._unlabelled()}

        def _unlabelled(self):
            for i in range(2):
                yield i, {"goal": f"Goal {i}", "sol1": "do it", "sol2": "do not", "label": -1}

    prepare(UnlabelledPiqa, str(tmp_path))
    with pytest.raises(UserError, match=r"^tfds:unlabelled_piqa/test\[0\] is not in the piqa format: label must be "
                                        r"an int from 0 to 1, got -1 \(an unlabelled row"):
        load_examples("piqa", "tfds:unlabelled_piqa/test", data_dir=str(tmp_path))
