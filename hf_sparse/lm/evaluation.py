"""Evaluating causal LMs the way LLM users measure them: token perplexity of held-out text at a stated length, and
answer-choice accuracy by log-likelihood (lm-evaluation-harness style) on SQuAD-format questions.

Both take any `AutoModelForCausalLM` and its tokenizer, run in eval mode under `torch.no_grad()` on the device the
model's input embeddings are on, and put every module back in the training mode it had.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._model import evaluating, input_device, pad_id_of
from .data import ChoiceQuestion


@dataclass(frozen=True)
class PerplexityResult:
    """Token perplexity of a set of texts, with what it was measured on.

    Attributes:
        perplexity: exp(`nll`).
        nll: mean negative log-likelihood per scored token, in nats.
        tokens: number of tokens scored (every token of every text after the first, within the length below).
        texts: number of texts.
        max_length: the longest sequence the model saw.
        stride: the sliding window's stride, or None when each text was scored alone, cut at `max_length`.
        truncated: texts longer than `max_length` (cut when `stride` is None, else scored in windows).
    """

    perplexity: float
    nll: float
    tokens: int
    texts: int
    max_length: int
    stride: int | None
    truncated: int

    def __str__(self) -> str:
        how = (
            f"each alone up to {self.max_length} tokens"
            if self.stride is None
            else f"windows of {self.max_length} tokens, stride {self.stride}"
        )
        return f"perplexity {self.perplexity:.2f} over {self.tokens} tokens of {self.texts} texts ({how})"


@dataclass(frozen=True)
class AnswerChoiceResult:
    """Accuracy of picking the gold answer among `choices` by log-likelihood, in percent.

    Attributes:
        accuracy: % of questions whose gold answer has the highest summed log-likelihood.
        accuracy_norm: the same with each answer's log-likelihood divided by its length in UTF-8 bytes
            (lm-evaluation-harness's `acc_norm`), which removes the preference for short answers.
        questions: number of questions scored.
        choices: answers per question (chance is 100 / choices).
        truncated: questions whose prompt was cut on the left to fit `max_length`.
        scores: for each question, the summed log-likelihood of each choice (in the order of its `choices`).
    """

    accuracy: float
    accuracy_norm: float
    questions: int
    choices: int
    truncated: int
    scores: tuple[tuple[float, ...], ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        return (
            f"answer choice accuracy {self.accuracy:.2f} (length-normalised {self.accuracy_norm:.2f}) on "
            f"{self.questions} questions of {self.choices} choices (chance {100 / self.choices:.2f})"
        )


def _score_segments(
    model: nn.Module, segments: Sequence[tuple[list[int], int]], pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """For each `(ids, first)`: the summed log-likelihood of `ids[first:]` given the tokens before each, and how many
    tokens that is. Segments run in batches of similar length, right-padded."""
    device = input_device(model)
    order = sorted(range(len(segments)), key=lambda i: len(segments[i][0]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(segments)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(segments[i][0]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = segments[i][0]
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention_mask[r, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for r, i in enumerate(rows):
            ids, first = segments[i]
            # position p predicts token p + 1: the scored tokens ids[first:] are predicted at first-1 .. len-2;
            # one row at a time keeps the float32 copy of the logits to one sequence
            predicted = logits[r, first - 1 : len(ids) - 1].float()
            targets = input_ids[r, first : len(ids)].to(predicted.device)
            nll = F.cross_entropy(predicted, targets, reduction="sum")
            results[i] = (-nll.item(), len(ids) - first)
    return results


def _windows(ids: list[int], max_length: int, stride: int | None) -> list[tuple[list[int], int]]:
    """The segments that score every token of `ids` after the first once: the text cut at `max_length`, or sliding
    windows of `max_length` that move by `stride` and score only the tokens the previous window did not (the
    transformers perplexity guide's scheme)."""
    if stride is None or len(ids) <= max_length:
        return [(ids[:max_length], 1)] if len(ids) > 1 else []
    segments, scored_up_to = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        # a window starting at a token the previous one did not reach cannot score that first token (no context)
        segments.append((window, max(len(window) - (end - scored_up_to), 1)))
        scored_up_to = end
        if end == len(ids):
            break
    return segments


def perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    add_special_tokens: bool = True,
) -> PerplexityResult:
    """Token perplexity of `texts`: exp of the mean negative log-likelihood over every token after the first, summed
    exactly over texts (padding and each text's first token are never scored).

    Each text is scored alone up to `max_length` tokens (a longer text is cut), or, with a `stride`, in sliding
    windows of `max_length` tokens that move by `stride` tokens, each scoring only the tokens the previous window
    did not, with up to `max_length - stride` tokens of context before them (as transformers' perplexity guide does).
    Perplexities are comparable only at the same length, stride and tokenizer: the result says which.

    Args:
        model: an `AutoModelForCausalLM` (put in eval mode for the measurement and back afterwards).
        tokenizer: its tokenizer.
        texts: the held-out texts.
        max_length: the longest sequence given to the model.
        stride: None to score each text alone (cut at `max_length`), or the sliding window's step (1 to max_length).
        batch_size: sequences per forward pass (texts of similar length are batched together). Memory grows with
            batch_size x max_length x vocabulary size for the logits.
        add_special_tokens: encode with the tokenizer's special tokens (a BOS token for Llama-style tokenizers).

    Example:

    ```python
    >>> from hf_sparse.lm import perplexity
    >>> result = perplexity(model, tokenizer, ["The quick brown fox jumps over the lazy dog."], max_length=512)
    >>> print(result)  # perplexity ... over ... tokens of 1 texts (each alone up to 512 tokens)
    ```
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings.")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2; got {max_length!r}.")
    if stride is not None and not (isinstance(stride, int) and 1 <= stride <= max_length):
        raise ValueError(f"stride must be None or an integer from 1 to max_length={max_length}; got {stride!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}.")
    _check_positions(model, max_length)
    encoded = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    segments = [s for ids in encoded for s in _windows(ids, max_length, stride)]
    with evaluating(model):
        scores = _score_segments(model, segments, pad_id_of(tokenizer), batch_size)
    tokens = sum(n for _, n in scores)
    if tokens == 0:
        raise ValueError("no token to score: every text encodes to fewer than two tokens.")
    nll = -sum(s for s, _ in scores) / tokens
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=tokens,
        texts=len(texts),
        max_length=max_length,
        stride=stride,
        truncated=sum(len(ids) > max_length for ids in encoded),
    )


def _check_positions(model: nn.Module, max_length: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(
            f"max_length={max_length} is longer than the model's max_position_embeddings={limit}; pass "
            f"max_length <= {limit}."
        )


def _encode_choice(tokenizer, prompt: str, answer: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """The prompt's tokens and the answer's, split as lm-evaluation-harness does: the answer's tokens are those of
    prompt + answer past the prompt's own encoding, so a tokenizer that merges across the boundary still scores the
    answer's text."""
    whole = tokenizer(prompt + answer, add_special_tokens=add_special_tokens)["input_ids"]
    context = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    return context, whole[len(context) :]


def _prompt(tokenizer, question: ChoiceQuestion, chat_template: bool) -> tuple[str, str, bool]:
    """The prompt text, the separator before the answer, and whether to add the tokenizer's special tokens."""
    text = f"{question.context}\n\nQuestion: {question.question}\nAnswer:"
    if not chat_template:
        return text, " ", True
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template; pass chat_template=False.")
    messages = [{"role": "user", "content": text.removesuffix("\nAnswer:") + "\nAnswer with a span of the text."}]
    # the template writes its own special tokens (BOS, role markers)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), "", False


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward takes `name`; a wrapper that passes **kwargs on (peft's) takes what its base
    model takes."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return name in inspect.signature(base.forward).parameters


def _score_answers(model: nn.Module, context: list[int], answers: list[list[int]], pad_id: int) -> list[float]:
    """Summed log-likelihood of each answer's tokens after `context`. The context runs once and its key/value cache
    is shared by the answers, which run together in one batch (right-padded); a model that returns no cache scores
    context + answer for each answer in full."""
    device = input_device(model)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=torch.tensor([context], device=device), use_cache=True, **extra)
    # transformers 5.25 renamed `past_key_values` to `cache` (the old name warns); earlier 5.x know only the old one
    cache_name = "cache" if _accepts(model, "cache") else "past_key_values"
    cache = (out["cache"] if "cache" in out else out.get("past_key_values")) if isinstance(out, dict) else None
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        segments = [(context + a, len(context)) for a in answers]
        return [s for s, _ in _score_segments(model, segments, pad_id, len(answers))]
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache.batch_repeat_interleave(len(answers))
    width = max(len(a) for a in answers)
    input_ids = torch.full((len(answers), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(answers), len(context) + width), dtype=torch.long)
    mask[:, : len(context)] = 1
    for r, a in enumerate(answers):
        input_ids[r, : len(a)] = torch.tensor(a)
        mask[r, len(context) : len(context) + len(a)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **{cache_name: cache}).logits
    scores = []
    for r, a in enumerate(answers):
        rest = -F.cross_entropy(
            logits[r, : len(a) - 1].float(), input_ids[r, 1 : len(a)].to(logits.device), reduction="sum"
        )
        scores.append(first[a[0]].item() + rest.item())
    return scores


def answer_choice_accuracy(
    model: nn.Module,
    tokenizer,
    questions: Sequence[ChoiceQuestion],
    max_length: int | None = None,
    chat_template: bool = False,
) -> AnswerChoiceResult:
    """Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness scores such tasks: for each question the
    model reads a prompt with the context and the question, and the choice whose tokens it gives the highest summed
    log-likelihood after the prompt is its answer (`accuracy`); `accuracy_norm` divides each choice's log-likelihood
    by its length in bytes first.

    The prompt is `"{context}\\n\\nQuestion: {question}\\nAnswer:"` followed by `" {choice}"`; with `chat_template`
    the context and question are the user's message of the tokenizer's chat template, and the choice the start of
    the assistant's reply. A prompt longer than `max_length` minus the longest choice is cut on the left.

    Args:
        model: an `AutoModelForCausalLM` (put in eval mode for the measurement and back afterwards).
        tokenizer: its tokenizer.
        questions: the questions and their choices, e.g. from `hf_sparse.lm.answer_choice_questions`.
        max_length: the longest sequence given to the model; None: the model's `max_position_embeddings` (2048 where
            its config has none).
        chat_template: wrap the prompt in the tokenizer's chat template (instruction-tuned models).

    Example:

    ```python
    >>> from hf_sparse.lm import answer_choice_accuracy, answer_choice_questions
    >>> from hf_sparse.squad import read_squad_json
    >>> questions = answer_choice_questions(read_squad_json("dev-v2.0.json"), num_choices=4, seed=0)
    >>> print(answer_choice_accuracy(model, tokenizer, questions[:200]))
    ```
    """
    if not questions:
        raise ValueError("no questions to score; answer_choice_questions found none with enough distractors.")
    choices = {len(q.choices) for q in questions}
    if len(choices) != 1:
        raise ValueError(f"every question must have the same number of choices; found {sorted(choices)}.")
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    _check_positions(model, max_length)
    pad_id = pad_id_of(tokenizer)
    right = right_norm = truncated = 0
    all_scores = []
    with evaluating(model):
        for question in questions:
            prompt, separator, special = _prompt(tokenizer, question, chat_template)
            encoded = [_encode_choice(tokenizer, prompt, separator + c, special) for c in question.choices]
            context, answers = encoded[0][0], [a for _, a in encoded]
            if any(not a for a in answers):
                raise ValueError(f"question {question.id!r}: a choice encodes to no tokens ({question.choices}).")
            room = max_length - max(len(a) for a in answers)
            if room < 1:
                raise ValueError(f"question {question.id!r}: a choice alone is longer than max_length={max_length}.")
            if len(context) > room:
                context, truncated = context[-room:], truncated + 1
            scores = _score_answers(model, context, answers, pad_id)
            all_scores.append(tuple(scores))
            right += max(range(len(scores)), key=scores.__getitem__) == question.gold
            normed = [s / max(len(c.encode()), 1) for s, c in zip(scores, question.choices)]
            right_norm += max(range(len(normed)), key=normed.__getitem__) == question.gold
    return AnswerChoiceResult(
        accuracy=100.0 * right / len(questions),
        accuracy_norm=100.0 * right_norm / len(questions),
        questions=len(questions),
        choices=choices.pop(),
        truncated=truncated,
        scores=tuple(all_scores),
    )
