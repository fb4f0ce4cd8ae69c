"""Tokenisation as the harness does it, prompt/label masking, and the batched scorer against a
brute-force computation (one unpadded forward per choice) on a tiny model."""
import pytest
import torch

from tests.finetune_assets import ROWS, task_rows, tiny_tokenizer, write_jsonl
from gmoe.finetune.encoding import IGNORE_INDEX, PadCollator, encode_pair, training_features
from gmoe.finetune.scoring import evaluate
from gmoe.finetune.tasks import get_task, load_examples


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.pad_token = t.eos_token
    return t


def test_encode_pair_moves_trailing_space_and_splits_after_context(tok):
    ctx, cont = encode_pair(tok, "The sun is a ", "star")
    assert ctx == tok("The sun is a", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("The sun is a star", add_special_tokens=False)["input_ids"]
    ctx2, cont2 = encode_pair(tok, "The sun is a", " star")
    assert (ctx2, cont2) == (ctx, cont)
    empty_ctx, cont3 = encode_pair(tok, "", "star")
    assert empty_ctx == [tok.eos_token_id] and cont3 == tok("star", add_special_tokens=False)["input_ids"]


def test_labels_mask_prompt_and_padding_exactly(tok, tmp_path):
    examples = load_examples(get_task("arc-c"), write_jsonl(tmp_path / "a.jsonl", task_rows("arc-c", 4)))
    feats = training_features(tok, examples, max_length=64)
    batch = PadCollator(tok.pad_token_id)(feats)
    for row, ex in enumerate(examples):
        ctx, cont = encode_pair(tok, ex.contexts[ex.gold], ex.continuations[ex.gold])
        n = len(ctx) + len(cont)
        assert batch["input_ids"][row, :n].tolist() == ctx + cont
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][row].tolist()
        assert labels[:len(ctx)] == [IGNORE_INDEX] * len(ctx)
        assert labels[len(ctx):n] == cont
        assert all(v == IGNORE_INDEX for v in labels[n:])
    # truncation keeps the continuation and drops prompt tokens from the left
    ctx, cont = encode_pair(tok, examples[0].contexts[examples[0].gold], examples[0].continuations[examples[0].gold])
    short = training_features(tok, examples[:1], max_length=len(cont) + 3)[0]
    assert short["input_ids"] == ctx[-3:] + cont
    assert short["labels"] == [IGNORE_INDEX] * 3 + cont


def brute_force(model, tok, examples):
    """One forward per (context, continuation), no padding, no batching."""
    scores = []
    with torch.no_grad():
        for ex in examples:
            row = []
            for c, k in zip(ex.contexts, ex.continuations):
                ctx, cont = encode_pair(tok, c, k)
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                row.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
            scores.append(row)
    return scores


def _argmax_with_margin(values):
    order = sorted(range(len(values)), key=lambda i: -values[i])
    return order[0], values[order[0]] - values[order[1]]


def check_against_brute_force(model, tok, examples, batch_size, max_batch_tokens=2048):
    model.eval()
    got = evaluate(model, tok, examples, batch_size=batch_size, max_length=128, max_batch_tokens=max_batch_tokens)
    want = brute_force(model, tok, examples)
    # fp32 forward of different batch shapes: each log-prob differs by ~1e-6 relative; a sum of
    # <= 20 terms of |log p| <= 10 stays well inside 1e-3.
    tol = 1e-3
    for g, w in zip(got["loglikelihoods"], want):
        assert g == pytest.approx(w, abs=tol)
    right = right_norm = decided = 0
    for ex, w, p, pn in zip(examples, want, got["predictions"], got["predictions_norm"]):
        best, margin = _argmax_with_margin(w)
        best_n, margin_n = _argmax_with_margin([s / n for s, n in zip(w, ex.norm_lengths)])
        if margin > 2 * tol and margin_n > 2 * tol:  # never rely on near-ties
            decided += 1
            assert p == best and pn == best_n
            right += best == ex.gold
            right_norm += best_n == ex.gold
    assert decided >= len(examples) // 2
    if decided == len(examples):
        assert got["acc"] == right / len(examples) and got["acc_norm"] == right_norm / len(examples)
    assert got["n"] == len(examples) and got["tokens"] > 0
    return got


def _examples(tmp_path):
    out = []
    for task in ("obqa", "hellaswag", "winogrande", "piqa", "boolq"):
        out += load_examples(get_task(task), write_jsonl(tmp_path / f"{task}.jsonl", task_rows(task, 3)))
    return out


def _tiny(tok, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def test_scorer_matches_brute_force_on_bare_model(tok, tmp_path):
    model = _tiny(tok)
    examples = _examples(tmp_path)
    got = check_against_brute_force(model, tok, examples, batch_size=5)
    again = evaluate(model, tok, examples, batch_size=5, max_length=128)
    assert got["loglikelihoods"] == again["loglikelihoods"]  # deterministic
    check_against_brute_force(model, tok, examples[:4], batch_size=1)  # no padding at all
    check_against_brute_force(model, tok, examples, batch_size=64, max_batch_tokens=60)  # batches cut by tokens


def test_acc_norm_divides_by_choice_characters(tok):
    from gmoe.finetune.scoring import pick

    from gmoe.finetune.tasks import Example

    # summed log-likelihoods -4 (1 char) vs -6 (10 chars): acc picks 0, acc_norm picks 1
    ex = Example(contexts=("a",) * 2, continuations=(" b", " cccccccccc"), gold=1, norm_lengths=(1, 10))
    scores = [-4.0, -6.0]
    assert pick(scores) == 0
    assert pick([s / n for s, n in zip(scores, ex.norm_lengths)]) == 1
    assert pick([1.0, 1.0]) == 0


@pytest.mark.parametrize("method", ["gmoe", "lora"])
def test_scorer_matches_brute_force_with_adapters(tok, tmp_path, method):
    from gmoe.finetune.methods import AdapterSpec, apply_method

    torch.manual_seed(1)
    model = apply_method(_tiny(tok), method, AdapterSpec(r=2, alpha=4, dropout=0.0, experts=4, top_k=2))
    with torch.no_grad():  # non-zero B so the adapters change the scores
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()
    examples = _examples(tmp_path)[:8]
    check_against_brute_force(model, tok, examples, batch_size=3)
    model.train()
    evaluate(model, tok, examples[:2], batch_size=2)
    assert model.training  # the caller's mode comes back


def test_rows_fixture_covers_every_task():
    from gmoe.finetune.tasks import TASKS

    assert set(ROWS) == set(TASKS)
