"""Zero-shot evaluation tasks in their public JSONL layouts, with the paper's prompt formats.

    gsm8k  {"question", "answer": "... #### 42"}           Q: …\\nA: 42
    csqa   {"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}
                                                             Q: …\\n(A) …\\n…\\n(E) …\\nA: X
    piqa   {"goal", "sol1", "sol2", "label": 0|1}           same multiple-choice format, (A)/(B)
    siqa   {"context", "question", "answerA".."answerC", "label": "1".."3"}   (A)..(C)

Multiple-choice answers are scored on the answer letter; GSM8K on the number after "####".
A row whose label has another type or lies out of range (test splits mark unlabelled rows
with -1 or "") is refused in one line naming its file and line (or tfds index): converted,
-1 would have been scored as the last choice.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from qstar_jax import paths
from qstar_jax.training.data import json_lines, open_tfds_split
from qstar_jax.errors import UserError

TASKS = ("gsm8k", "csqa", "piqa", "siqa")
LETTERS = "ABCDE"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # ends with "A:"; the answer continues it after a space
    answer: str  # "B" or "42"
    choices: tuple[str, ...] = ()  # answer letters for multiple choice; () for GSM8K
    question: str = ""  # GSM8K question alone (for chain-of-thought prompts)


def extract_number(text: str) -> str | None:
    """The first number in `text`, without thousands separators (GSM8K convention)."""
    match = NUMBER.search(text)
    if match is None:
        return None
    number = match.group(0).replace(",", "")
    return number[:-2] if number.endswith(".0") else number


class BadValue(ValueError):
    """A field whose value the task's format does not allow; the message names the field."""


UNLABELLED = (-1, "-1", "", None)  # how test splits mark a row without its answer


def _shown(value: Any) -> str:
    """`value` for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unlabelled_note(label: Any) -> str:
    return " (an unlabelled row, as test splits have, cannot be scored)" if label in UNLABELLED else ""


def _text(value: Any, field: str) -> str:
    """A text field; a number, null or list would otherwise be printed into the prompt as is."""
    if not isinstance(value, str):
        raise BadValue(f"{field} must be text, got {_shown(value)}")
    return value


def _index_label(label: Any, n_choices: int) -> int:
    """A 0-based answer index (PIQA's "label"), an int and nothing else: -1 (PIQA's
    unlabelled test rows) would pick the last choice through negative indexing, and a
    bool, float or string is another file's layout, not an index to convert."""
    if type(label) is not int or not 0 <= label < n_choices:
        raise BadValue(f"label must be an int from 0 to {n_choices - 1}, got {_shown(label)}{_unlabelled_note(label)}")
    return label


def _one_based_label(label: Any, n_choices: int) -> int:
    """A 1-based answer number as text (SIQA's "label": "1".."3"), as a 0-based index. An
    int is refused, not converted: a tfds ClassLabel stores 0-based ints, so 1 could mean
    either the first or the second answer."""
    names = [str(i) for i in range(1, n_choices + 1)]
    if not isinstance(label, str) or label not in names:
        allowed = ", ".join(f'"{n}"' for n in names)
        raise BadValue(f"label must be the text {allowed} (1-based), got {_shown(label)}{_unlabelled_note(label)}")
    return names.index(label)


def _multiple_choice(question: str, options: list[str], answer_index: int) -> Example:
    if not 2 <= len(options) <= len(LETTERS):
        raise BadValue(f"{len(options)} choices; the prompt letters 2 to {len(LETTERS)} ({', '.join(LETTERS)})")
    letters = LETTERS[: len(options)]
    lines = [f"Q: {question}"] + [f"({l}) {o}" for l, o in zip(letters, options)] + ["A:"]
    return Example("\n".join(lines), letters[answer_index], tuple(letters))


def _gsm8k(record: dict[str, Any]) -> Example:
    solution = _text(record["answer"], "answer")
    if "####" not in solution:
        raise BadValue("answer has no '#### N' (the final answer after the solution)")
    answer = extract_number(solution.split("####")[-1])
    if answer is None:
        raise BadValue(f"answer has no number after '####': {_shown(solution.split('####')[-1])}")
    question = _text(record["question"], "question")
    return Example(f"Q: {question}\nA:", answer, (), question)


def _csqa(record: dict[str, Any]) -> Example:
    """The choices in label order, lettered A.. in the prompt; answerKey must be one of the
    labels (CommonsenseQA's test rows have an empty one)."""
    question = record["question"]
    choices = question["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise BadValue(f"question.choices must be a list of {{label, text}} objects, got {_shown(choices)}")
    labels = [c["label"] for c in choices]
    if not all(isinstance(label, str) for label in labels) or len(set(labels)) != len(labels):
        raise BadValue(f"choice labels must be distinct letters, got {_shown(labels)}")
    ordered = sorted(choices, key=lambda c: c["label"])
    labels = [c["label"] for c in ordered]
    answer = record["answerKey"]
    if not isinstance(answer, str) or answer not in labels:
        raise BadValue(f"answerKey must be one of the choice labels {', '.join(labels)}, got {_shown(answer)}"
                       f"{_unlabelled_note(answer)}")
    return _multiple_choice(_text(question["stem"], "question.stem"),
                            [_text(c["text"], "choice text") for c in ordered], labels.index(answer))


def _parse(task: str, record: Any) -> Example:
    if not isinstance(record, dict):
        raise BadValue(f"a row must be a JSON object, got {_shown(record)}")
    if task == "gsm8k":
        return _gsm8k(record)
    if task == "csqa":
        return _csqa(record)
    if task == "piqa":
        options = [_text(record["sol1"], "sol1"), _text(record["sol2"], "sol2")]
        return _multiple_choice(_text(record["goal"], "goal"), options, _index_label(record["label"], len(options)))
    if task == "siqa":
        options = [_text(record[f"answer{letter}"], f"answer{letter}") for letter in "ABC"]
        question = f"{_text(record['context'], 'context')} {_text(record['question'], 'question')}"
        return _multiple_choice(question, options, _one_based_label(record["label"], len(options)))
    raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


TFDS_PREFIX = "tfds:"


def _plain(value: Any) -> Any:
    """tfds records hold bytes, numpy scalars and dicts of lists; make them JSON-like."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        value = {k: _plain(v) for k, v in value.items()}
        if value and all(isinstance(v, list) for v in value.values()):  # Sequence({...}) -> list of dicts
            return [dict(zip(value, row)) for row in zip(*value.values())] if "label" in value else value
        return value
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _records(path: str, data_dir: str | None):
    """(location, record) pairs from a JSONL file or from "tfds:NAME/SPLIT" in `data_dir`."""
    if path.startswith(TFDS_PREFIX):
        name, _, split = path[len(TFDS_PREFIX):].partition("/")
        source = open_tfds_split(name, split or "test", data_dir)
        for i in range(len(source)):
            yield f"{path}[{i}]", _plain(source[i])
        return
    if not paths.path(path).is_file():
        raise UserError(f"data file not found: {path}")
    for line_number, record in json_lines(paths.path(path)):
        yield f"{path}:{line_number}", record


def load_examples(task: str, path: str, limit: int = 0, data_dir: str | None = None) -> list[Example]:
    """Examples from a JSONL file in the task's public layout, or "tfds:NAME/SPLIT" (prepared
    in `data_dir`) whose records use the same field names."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if limit < 0:
        raise UserError(f"the example limit must be >= 0 (0 = all), got {limit}")
    examples = []
    for where, record in _records(path, data_dir):
        try:
            examples.append(_parse(task, record))
        except BadValue as e:
            raise UserError(f"{where} is not in the {task} format: {e}") from None
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"{where} is not in the {task} format (missing or bad {e})") from None
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise UserError(f"no examples in {path}")
    return examples
