"""Evaluation of causal LMs (`hf_sparse.lm`): token perplexity and answer-choice accuracy, against references
computed here one sequence at a time without padding, caches or batching."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sparse.lm import (
    ChoiceQuestion,
    answer_choice_accuracy,
    answer_choice_questions,
    byte_tokenizer,
    perplexity,
)
from hf_sparse.squad import read_squad_json
from tests.conftest import needs_gpu, shared_data

TEXTS = [
    "The Normans were the people who gave their name to Normandy, a region in France.",
    "Short.",
    "Computational complexity theory classifies problems by the resources they need. " * 3,
]


def tiny_llama(tokenizer=None, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-block Llama (GQA: 4 heads, 2 key-value heads) that reads `byte_tokenizer()`."""
    tokenizer = tokenizer or byte_tokenizer()
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**values)).eval()


@torch.no_grad()
def _log_likelihood(model, ids: list[int], first: int) -> float:
    """Summed log-likelihood of ids[first:], one unpadded sequence."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return -F.cross_entropy(logits[first - 1 : len(ids) - 1], torch.tensor(ids[first:]), reduction="sum").item()


def test_perplexity_sums_every_token_after_the_first_exactly_across_padded_batches():
    tokenizer, model = byte_tokenizer(), tiny_llama()
    encoded = [tokenizer(t).input_ids for t in TEXTS]
    total = sum(_log_likelihood(model, ids, 1) for ids in encoded)
    tokens = sum(len(ids) - 1 for ids in encoded)
    for batch_size in (1, 2, 3):
        result = perplexity(model, tokenizer, TEXTS, max_length=512, batch_size=batch_size)
        assert result.tokens == tokens and result.texts == 3 and result.truncated == 0
        assert result.nll == pytest.approx(-total / tokens, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(-total / tokens), rel=1e-5)
    assert f"over {tokens} tokens of 3 texts (each alone up to 512 tokens)" in str(result)


def test_perplexity_cuts_each_text_at_max_length():
    tokenizer, model = byte_tokenizer(), tiny_llama()
    encoded = [tokenizer(t).input_ids[:40] for t in TEXTS]
    result = perplexity(model, tokenizer, TEXTS, max_length=40)
    assert result.tokens == sum(len(ids) - 1 for ids in encoded)
    assert result.truncated == 2  # the first and the third text are longer than 40 bytes
    expected = -sum(_log_likelihood(model, ids, 1) for ids in encoded) / result.tokens
    assert result.nll == pytest.approx(expected, rel=1e-5)


def _guide_sliding_window(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide, summing exactly: each window's labels are -100 except the last trg_len."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids=window).logits
        shifted = labels[:, 1:]
        nll += F.cross_entropy(logits[0, :-1], shifted[0], ignore_index=-100, reduction="sum").item()
        count += int((shifted != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize("max_length,stride", [(64, 16), (64, 64), (32, 7)])
def test_sliding_window_perplexity_scores_as_the_transformers_guide(max_length, stride):
    tokenizer, model = byte_tokenizer(), tiny_llama()
    sums = [_guide_sliding_window(model, tokenizer(t).input_ids, max_length, stride) for t in TEXTS]
    result = perplexity(model, tokenizer, TEXTS, max_length=max_length, stride=stride, batch_size=4)
    assert result.tokens == sum(c for _, c in sums)
    assert result.nll == pytest.approx(sum(n for n, _ in sums) / result.tokens, rel=1e-5)
    if stride < max_length:  # every token after each text's first is scored once
        assert result.tokens == sum(len(tokenizer(t).input_ids) - 1 for t in TEXTS)
    assert result.stride == stride and f"stride {stride}" in str(result)


def test_evaluation_restores_each_module_training_mode_and_keeps_no_gradients():
    tokenizer, model = byte_tokenizer(), tiny_llama()
    model.train()
    model.model.layers[0].eval()  # a frozen part kept in eval mode while the rest trains
    modes = {name: m.training for name, m in model.named_modules()}
    perplexity(model, tokenizer, TEXTS[:1])
    questions = answer_choice_questions(_records(), num_choices=3)
    answer_choice_accuracy(model, tokenizer, questions)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_are_named():
    tokenizer, model = byte_tokenizer(), tiny_llama(max_position_embeddings=64)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        perplexity(model, tokenizer, TEXTS, max_length=128)
    with pytest.raises(ValueError, match="stride must be None or an integer from 1 to max_length=32"):
        perplexity(model, tokenizer, TEXTS, max_length=32, stride=33)
    with pytest.raises(TypeError, match="list of strings"):
        perplexity(model, tokenizer, "one text", max_length=32)
    with pytest.raises(ValueError, match="fewer than two tokens"):
        perplexity(model, tokenizer, [""], max_length=32)
    with pytest.raises(ValueError, match="num_choices must be an integer >= 2"):
        answer_choice_questions(_records(), num_choices=1)
    with pytest.raises(ValueError, match="no questions"):
        answer_choice_accuracy(model, tokenizer, [])
    tokenizer.chat_template = None
    questions = answer_choice_questions(_records(), num_choices=3)
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        answer_choice_accuracy(model, tokenizer, questions, chat_template=True)


def _records() -> list[dict]:
    """Two small articles of SQuAD records: five answerable questions in the first, one unanswerable."""
    context = "Paris is the capital of France. The Seine runs through it. It has two million people."
    rows = [
        ("a1", "Cities", "What is the capital of France?", ["Paris", "paris"]),
        ("a2", "Cities", "Which river runs through Paris?", ["The Seine", "Seine"]),
        ("a3", "Cities", "How many people live in Paris?", ["two million"]),
        ("a4", "Cities", "Of which country is Paris the capital?", ["France"]),
        ("a5", "Cities", "What is Paris?", ["the capital of France"]),
        ("a6", "Cities", "Who founded Paris?", []),
        ("b1", "Rivers", "What runs through Paris?", ["The Seine"]),
    ]
    return [
        {
            "id": i,
            "title": title,
            "context": context,
            "question": q,
            "answers": {"text": a, "answer_start": [0] * len(a)},
        }
        for i, title, q, a in rows
    ]


def test_answer_choices_come_from_the_same_article_and_never_repeat_the_gold_answer():
    questions = answer_choice_questions(_records(), num_choices=4, seed=0)
    by_id = {q.id: q for q in questions}
    # a6 is unanswerable; b1's article has no other answer to draw distractors from
    assert set(by_id) == {"a1", "a2", "a3", "a4", "a5"}
    article = {"Paris", "The Seine", "two million", "France", "the capital of France"}
    for q in questions:
        assert len(q.choices) == 4 and len(set(q.choices)) == 4 and set(q.choices) <= article
        assert q.choices[q.gold] == next(r for r in _records() if r["id"] == q.id)["answers"]["text"][0]
        assert q.choices.count(q.choices[q.gold]) == 1  # "Paris" is a1's gold answer and no distractor of a1


def test_the_choice_of_distractors_is_deterministic_and_independent_of_the_other_questions():
    records = read_squad_json(shared_data("squad", "squad-v2-dev-sample.json"))
    first = answer_choice_questions(records, num_choices=4, seed=0)
    assert len(first) == sum(bool(r["answers"]["text"]) for r in records)  # every article has enough answers
    assert answer_choice_questions(records, num_choices=4, seed=0) == first
    alone = answer_choice_questions([r for r in records if r["title"] == records[-1]["title"]][::-1], 4, seed=0)
    assert {q.id: q for q in alone} == {q.id: q for q in first if q.id in {a.id for a in alone}}
    other = answer_choice_questions(records, num_choices=4, seed=1)
    assert sum(a.choices != b.choices for a, b in zip(first, other)) > 0.9 * len(first)
    # the gold answer's position is drawn too: a model that always picks the first choice is at chance
    positions = [q.gold for q in first]
    assert all(abs(positions.count(g) / len(first) - 0.25) < 0.05 for g in range(4))


def _reference_scores(model, tokenizer, question: ChoiceQuestion, chat_template: bool, max_length: int = 512):
    """Each choice's log-likelihood from one full forward of prompt + choice (lm-evaluation-harness's encoding)."""
    text = f"{question.context}\n\nQuestion: {question.question}\nAnswer:"
    if chat_template:
        user = text.removesuffix("\nAnswer:") + "\nAnswer with a span of the text."
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
    special = not chat_template
    context = tokenizer(text, add_special_tokens=special).input_ids
    answers = [
        tokenizer(text + ("" if chat_template else " ") + c, add_special_tokens=special).input_ids[len(context) :]
        for c in question.choices
    ]
    context = context[-(max_length - max(len(a) for a in answers)) :]
    return [_log_likelihood(model, context + a, len(context)) for a in answers]


@pytest.mark.parametrize("chat_template", [False, True])
def test_answer_choice_scores_match_one_full_forward_per_choice(chat_template):
    tokenizer, model = byte_tokenizer(), tiny_llama()
    questions = answer_choice_questions(_records(), num_choices=4, seed=0)
    result = answer_choice_accuracy(model, tokenizer, questions, chat_template=chat_template)
    expected = [_reference_scores(model, tokenizer, q, chat_template) for q in questions]
    assert [list(s) for s in result.scores] == [pytest.approx(e, rel=1e-5) for e in expected]
    picks = [max(range(4), key=s.__getitem__) for s in expected]
    normed = [
        max(range(4), key=lambda i, s=s, q=q: s[i] / len(q.choices[i].encode())) for s, q in zip(expected, questions)
    ]
    assert result.accuracy == pytest.approx(100 * sum(p == q.gold for p, q in zip(picks, questions)) / len(questions))
    assert result.accuracy_norm == pytest.approx(100 * sum(p == q.gold for p, q in zip(normed, questions)) / 5)
    assert (result.questions, result.choices, result.truncated) == (5, 4, 0)


def test_a_prompt_too_long_is_cut_on_the_left():
    tokenizer, model = byte_tokenizer(), tiny_llama()
    questions = answer_choice_questions(_records(), num_choices=2, seed=0)
    result = answer_choice_accuracy(model, tokenizer, questions, max_length=60)
    assert result.truncated == len(questions)
    expected = [_reference_scores(model, tokenizer, q, False, max_length=60) for q in questions]
    assert [list(s) for s in result.scores] == [pytest.approx(e, rel=1e-5) for e in expected]


class _NoCacheLlama(LlamaForCausalLM):
    """A causal LM that returns no key/value cache."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out["cache"] = None
        return out


def test_a_model_without_a_cache_scores_each_choice_in_full():
    tokenizer, model = byte_tokenizer(), tiny_llama()
    no_cache = _NoCacheLlama(model.config).eval()
    no_cache.load_state_dict(model.state_dict())
    questions = answer_choice_questions(_records(), num_choices=4, seed=0)
    cached = answer_choice_accuracy(model, tokenizer, questions)
    uncached = answer_choice_accuracy(no_cache, tokenizer, questions)
    assert [list(s) for s in uncached.scores] == [pytest.approx(list(s), rel=1e-5) for s in cached.scores]


def test_questions_with_different_numbers_of_choices_are_refused():
    tokenizer, model = byte_tokenizer(), tiny_llama()
    questions = answer_choice_questions(_records(), num_choices=3)
    mixed = [questions[0], replace(questions[1], choices=questions[1].choices[:2], gold=0)]
    with pytest.raises(ValueError, match=r"same number of choices; found \[2, 3\]"):
        answer_choice_accuracy(model, tokenizer, mixed)


def _gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=512)
    return GPT2LMHeadModel(config).eval()


def test_a_gpt2_style_model_is_measured_the_same_way():
    # absolute position embeddings, a fused q/k/v Conv1D and a legacy class name: the same exact sums
    tokenizer = byte_tokenizer()
    model = _gpt2(tokenizer)
    encoded = [tokenizer(t).input_ids for t in TEXTS]
    expected = -sum(_log_likelihood(model, ids, 1) for ids in encoded) / sum(len(ids) - 1 for ids in encoded)
    assert perplexity(model, tokenizer, TEXTS, batch_size=3).nll == pytest.approx(expected, rel=1e-5)
    questions = answer_choice_questions(_records(), num_choices=4, seed=0)
    result = answer_choice_accuracy(model, tokenizer, questions)
    reference = [_reference_scores(model, tokenizer, q, False) for q in questions]
    assert [list(s) for s in result.scores] == [pytest.approx(e, rel=1e-5) for e in reference]


@needs_gpu
def test_on_a_gpu_the_measurements_match_the_cpu():
    tokenizer, model = byte_tokenizer(), tiny_llama()
    questions = answer_choice_questions(_records(), num_choices=4, seed=0)
    on_cpu = perplexity(model, tokenizer, TEXTS), answer_choice_accuracy(model, tokenizer, questions)
    model.cuda()
    on_gpu = perplexity(model, tokenizer, TEXTS), answer_choice_accuracy(model, tokenizer, questions)
    assert on_gpu[0].tokens == on_cpu[0].tokens and on_gpu[0].nll == pytest.approx(on_cpu[0].nll, rel=1e-4)
    assert [list(s) for s in on_gpu[1].scores] == [pytest.approx(list(s), rel=1e-4) for s in on_cpu[1].scores]


def test_a_peft_wrapped_model_scores_as_its_base_model(recwarn):
    peft = pytest.importorskip("peft", reason="install the test extra: pip install -e '.[test]'")
    tokenizer, model = byte_tokenizer(), tiny_llama()
    questions = answer_choice_questions(_records(), num_choices=4, seed=0)
    base = answer_choice_accuracy(model, tokenizer, questions)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"]))  # B = 0: no change
    scores = answer_choice_accuracy(wrapped, tokenizer, questions).scores
    assert [list(s) for s in scores] == [pytest.approx(list(s), rel=1e-6) for s in base.scores]
    assert perplexity(wrapped, tokenizer, TEXTS).nll == pytest.approx(perplexity(model, tokenizer, TEXTS).nll)
    # the cache goes by the name the base model's forward takes (transformers 5.25 deprecates past_key_values)
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
