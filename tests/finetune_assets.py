"""Offline assets for the fine-tuning tests: a byte-level BPE tokenizer trained on the fly on a
little text, a tiny Llama built from a config, and one JSONL row per task in its own fields."""
from __future__ import annotations

import json

import torch
import transformers

ROWS = {
    "arc-c": {"id": "x1", "question": "Which gas do plants take in?",
              "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
              "answerKey": "B"},
    "arc-e": {"id": "x2", "question": "What melts ice?",
              "choices": {"text": ["heat", "cold", "dark"], "label": ["1", "2", "3"]}, "answerKey": "1"},
    "boolq": {"question": "is the sky blue", "answer": True, "passage": "The sky is blue on a clear day."},
    "obqa": {"id": "x3", "question_stem": "The sun is a",
             "choices": {"text": ["star", "planet", "moon", "comet"], "label": ["A", "B", "C", "D"]},
             "answerKey": "A"},
    "siqa": {"context": "Tracy went home.", "question": "What will Tracy do next?", "answerA": "sleep",
             "answerB": "fly", "answerC": "swim", "label": "1"},
    "piqa": {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
    "hellaswag": {"ind": 1, "activity_label": "Cooking", "ctx_a": "A man cuts onions [title] on a board.",
                  "ctx_b": "he", "ctx": "", "endings": ["puts them in a pan.", "flies away [step] fast.",
                                                      "sings  loudly.", "drives a car."],
                  "source_id": "s", "split": "val", "split_type": "indomain", "label": "0"},
    "winogrande": {"sentence": "The cup did not fit in the box because the _ was too big.",
                   "option1": "cup", "option2": "box", "answer": "1"},
}

TEXT = ("Question: Which gas do plants take in? Answer: carbon dioxide. The sun is a star. "
        "Tracy went home and went to sleep. How do I open a jar? Twist the lid. A man cuts onions. "
        "The cup did not fit in the box because the cup was too big. Is the sky blue? yes no ") * 4


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    return fast


def tiny_model_folder(path, layers: int = 2, seed: int = 0) -> str:
    """A local Hugging Face folder (config, weights, tokenizer) of a random tiny Llama."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=8, max_position_embeddings=256, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def task_rows(task: str, n: int) -> list[dict]:
    """n copies of the task's row with the gold answer rotated, so splits and scores see variety."""
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(ROWS[task]))
        if task in ("arc-c", "arc-e", "obqa"):
            labels = row["choices"]["label"]
            row["answerKey"] = labels[i % len(labels)]
        elif task == "boolq":
            row["answer"] = bool(i % 2)
        elif task == "siqa":
            row["label"] = str(1 + i % 3)
        elif task == "piqa":
            row["label"] = i % 2
        elif task == "hellaswag":
            row["label"] = str(i % 4)
        elif task == "winogrande":
            row["answer"] = str(1 + i % 2)
        rows.append(row)
    return rows


#: gmoe-finetune flags for a run on the tiny model that takes seconds: 2 steps, r 2, E 4, K 2, short sequences.
TINY_RUN = ["--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "8", "--r", "2", "--alpha", "4",
            "--experts", "4", "--top-k", "2", "--log-steps", "1", "--max-length", "64"]


def tiny_job_files(root, rows: int = 16):
    """(root, a tiny model folder, an OBQA JSONL of `rows` rows) under `root`, for end-to-end job tests."""
    model = tiny_model_folder(root / "tiny")
    data = write_jsonl(root / "obqa.jsonl", task_rows("obqa", rows))
    return root, model, data
