"""Zero-shot evaluation tasks in their public JSONL layouts, with the paper's prompt formats.

    gsm8k  {"question", "answer": "... #### 42"}           Q: …\\nA: 42
    csqa   {"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}
                                                             Q: …\\n(A) …\\n…\\n(E) …\\nA: X
    piqa   {"goal", "sol1", "sol2", "label": 0|1}           same multiple-choice format, (A)/(B)
    siqa   {"context", "question", "answerA".."answerC", "label": "1".."3"}   (A)..(C)

Multiple-choice answers are scored on the answer letter; GSM8K on the number after "####".
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


def _multiple_choice(question: str, options: list[str], answer_index: int) -> Example:
    letters = LETTERS[: len(options)]
    lines = [f"Q: {question}"] + [f"({l}) {o}" for l, o in zip(letters, options)] + ["A:"]
    return Example("\n".join(lines), letters[answer_index], tuple(letters))


def _parse(task: str, record: dict[str, Any]) -> Example:
    if task == "gsm8k":
        if "####" not in record["answer"]:
            raise KeyError("answer with '#### N'")
        answer = extract_number(record["answer"].split("####")[-1])
        if answer is None:
            raise KeyError("a number after '####'")
        return Example(f"Q: {record['question']}\nA:", answer, (), record["question"])
    if task == "csqa":
        question = record["question"]
        choices = sorted(question["choices"], key=lambda c: c["label"])
        labels = [c["label"] for c in choices]
        return _multiple_choice(question["stem"], [c["text"] for c in choices], labels.index(record["answerKey"]))
    if task == "piqa":
        return _multiple_choice(record["goal"], [record["sol1"], record["sol2"]], int(record["label"]))
    if task == "siqa":
        options = [record["answerA"], record["answerB"], record["answerC"]]
        return _multiple_choice(f"{record['context']} {record['question']}", options, int(record["label"]) - 1)
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
    examples = []
    for where, record in _records(path, data_dir):
        try:
            examples.append(_parse(task, record))
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"{where} is not in the {task} format (missing or bad {e})") from None
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise UserError(f"no examples in {path}")
    return examples
