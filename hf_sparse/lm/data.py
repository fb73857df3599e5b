"""Data for causal LMs: answer-choice questions built from SQuAD-format records, and a training set of text the
dense teacher generates from prompts (data-free distillation, for a user without a corpus)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._model import evaluating, input_device, pad_id_of


@dataclass(frozen=True)
class ChoiceQuestion:
    """A question with its answer choices.

    Attributes:
        id: the SQuAD question id.
        context: the paragraph the answer is in.
        question: the question.
        choices: the answers to choose among.
        gold: index of the gold answer in `choices`.
    """

    id: str
    context: str
    question: str
    choices: tuple[str, ...]
    gold: int


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def answer_choice_questions(
    records: Sequence[Mapping[str, Any]], num_choices: int = 4, seed: int = 0
) -> list[ChoiceQuestion]:
    """Multiple-choice questions from SQuAD records: each answerable question's first gold answer against
    `num_choices - 1` distractors, the gold answers of other questions of the same article (`title`), as
    lm-evaluation-harness-style tasks build choices from a document's own answers.

    The choice is deterministic: a question's distractors and the gold answer's position are drawn by a generator
    seeded with `seed` and the question's id, so they do not change when other questions are added or removed. A
    distractor never equals any of the question's gold answers (case and spacing aside); unanswerable questions,
    and questions whose article has too few other answers, are left out.

    Args:
        records: SQuAD records (`hf_sparse.squad.read_squad_json` or `squad_records`), with `id`, `title`,
            `context`, `question` and `answers`.
        num_choices: answers per question, the gold one included (chance is 1 / num_choices).
        seed: the seed of the choice of distractors and of the gold answer's position.

    Example:

    ```python
    >>> from hf_sparse.lm import answer_choice_questions
    >>> from hf_sparse.squad import read_squad_json
    >>> questions = answer_choice_questions(read_squad_json("dev-v2.0.json"), num_choices=4)
    >>> questions[0].choices, questions[0].gold
    ```
    """
    if not isinstance(num_choices, int) or num_choices < 2:
        raise ValueError(f"num_choices must be an integer >= 2; got {num_choices!r}.")
    answers_of_article: dict[str, dict[str, str]] = {}
    for record in records:
        if record["answers"]["text"]:
            gold = record["answers"]["text"][0]
            answers_of_article.setdefault(record.get("title", ""), {}).setdefault(_normalized(gold), gold)
    questions = []
    for record in records:
        golds = record["answers"]["text"]
        if not golds:
            continue
        own = {_normalized(g) for g in golds}
        pool = [text for key, text in sorted(answers_of_article[record.get("title", "")].items()) if key not in own]
        if len(pool) < num_choices - 1:
            continue
        rng = random.Random(f"{seed}:{record['id']}")  # str seeds are hashed with SHA-512: the same on every run
        choices = rng.sample(pool, num_choices - 1)
        gold = rng.randrange(num_choices)
        choices.insert(gold, golds[0])
        questions.append(ChoiceQuestion(record["id"], record["context"], record["question"], tuple(choices), gold))
    return questions


def teacher_generations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    chat_template: bool = False,
    train_on_prompt: bool = False,
):
    """A training set of text the (dense) model writes itself: for data-free distillation, when there is no corpus.

    Each prompt is continued by sampling (`temperature`, `top_p`) up to `max_new_tokens` new tokens or the end of
    sequence, reproducibly from `seed` (the caller's random state is left as it was). The rows hold the prompt's
    tokens followed by the generated ones, as the model produced them (no decode and re-encode), with `labels` that
    are -100 on the prompt unless `train_on_prompt`, so that a distillation loss or the language-model loss counts
    the generated tokens only. The model is put in eval mode for generation and back afterwards.

    Args:
        model: the teacher, an `AutoModelForCausalLM`.
        tokenizer: its tokenizer.
        prompts: the prompts (e.g. the questions or instructions the model will be used on).
        max_new_tokens: the most tokens generated per prompt.
        seed: the sampling seed.
        temperature, top_p: the sampling parameters (`generate`'s).
        batch_size: prompts per `generate` call (left-padded).
        chat_template: wrap each prompt as a user message in the tokenizer's chat template (instruction-tuned
            models), with the assistant's turn opened.
        train_on_prompt: label the prompt's tokens too.

    Returns:
        A `datasets.Dataset` with `input_ids`, `attention_mask` and `labels`, for `transformers.Trainer` (with a
        padding collator such as `DataCollatorForSeq2Seq`) or `trl.SFTTrainer`, and `hf_sparse.DistillationLoss`.

    Example:

    ```python
    >>> import copy
    >>> from hf_sparse import DistillationLoss
    >>> from hf_sparse.lm import teacher_generations
    >>> teacher = copy.deepcopy(model)
    >>> train = teacher_generations(teacher, tokenizer, ["Tell me about Paris.", "Write a haiku."], max_new_tokens=256)
    >>> loss = DistillationLoss(teacher, model)  # the student learns the teacher's distributions on its own text
    ```
    """
    from datasets import Dataset

    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a non-empty list of strings.")
    if chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template; pass chat_template=False.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}.")
    if not temperature > 0 or not 0 < top_p <= 1 or batch_size < 1:
        raise ValueError(
            f"need temperature > 0, 0 < top_p <= 1 and batch_size >= 1; got temperature={temperature!r}, "
            f"top_p={top_p!r}, batch_size={batch_size!r}."
        )
    encoded = [_encode_prompt(tokenizer, p, chat_template) for p in prompts]
    device = input_device(model)
    stops = _stop_ids(model, tokenizer)
    pad_id = pad_id_of(tokenizer)
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    forked = [device] if device.type == "cuda" else []
    with evaluating(model), torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
            )
            for ids, generated in zip(batch, out[:, width:].tolist()):
                generated = _until_stop(generated, stops)
                rows["input_ids"].append(ids + generated)
                rows["attention_mask"].append([1] * (len(ids) + len(generated)))
                rows["labels"].append((ids if train_on_prompt else [-100] * len(ids)) + generated)
    return Dataset.from_dict(rows)


def _encode_prompt(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    if not chat_template:
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _until_stop(generated: list[int], stops: set[int]) -> list[int]:
    """The generated tokens up to and including the first end of sequence (what follows is padding)."""
    for i, token in enumerate(generated):
        if token in stops:
            return generated[: i + 1]
    return generated


def split_by_article(records: Sequence[Mapping[str, Any]], eval_articles: int) -> tuple[list, list]:
    """(the other records, the evaluation records) of SQuAD records: the last `eval_articles` articles (`title`, in
    the order of the file) are evaluation, so no paragraph or question of them is calibrated or trained on.

    Example:

    ```python
    >>> from hf_sparse.lm.data import split_by_article
    >>> other, held = split_by_article(read_squad_json("squad-v2-dev-sample.json"), eval_articles=2)
    ```
    """
    titles = list(dict.fromkeys(r["title"] for r in records))
    if not isinstance(eval_articles, int) or not 1 <= eval_articles < len(titles):
        raise ValueError(
            f"eval_articles must be from 1 to {len(titles) - 1} (the file has {len(titles)} articles); "
            f"got {eval_articles!r}."
        )
    held = set(titles[-eval_articles:])
    return [r for r in records if r["title"] not in held], [r for r in records if r["title"] in held]


def spread(items: Sequence, n: int | None) -> list:
    """`n` items taken evenly through `items` (so that every article of an evaluation set is represented); all of
    them when `n` is None or at least their number."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def read_texts(path) -> list[str]:
    """The texts of a local file: `.txt`, one text per non-blank line; `.json` / `.jsonl`, the `"text"` field of each
    record (a JSON list of records, or one record per line)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a .txt file (one text per line) or a .json/.jsonl file "
                                "of records with a 'text' field.")  # fmt: skip
    if path.suffix == ".txt":
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix in (".json", ".jsonl"):
        raw = path.read_text()
        records = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" else (
            json.loads(raw))  # fmt: skip
        if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("text"), str)
                                                    for r in records):  # fmt: skip
            raise ValueError(f"{path}: expected records with a 'text' string field (a JSON list, or one per line).")
        texts = [r["text"] for r in records]
    else:
        raise ValueError(f"{path}: unknown text file type {path.suffix!r}; use .txt, .json or .jsonl.")
    if not texts:
        raise ValueError(f"{path} holds no text.")
    return texts


def language_modeling_rows(tokenizer, texts: Sequence[str], max_length: int):
    """A training set of `texts` for a causal LM: each text tokenized alone and cut at `max_length` tokens, with
    `labels` equal to the input ids (the Trainer's language-model loss and `hf_sparse.DistillationLoss` shift them);
    pad the batches with a collator such as `DataCollatorForSeq2Seq`."""
    from datasets import Dataset

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return Dataset.from_dict(
        {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": [list(ids) for ids in encoded["input_ids"]],
        }  # fmt: skip
    )


def packed_sequences(tokenizer, texts: Sequence[str], length: int, max_sequences: int | None = None) -> dict:
    """Calibration text as SparseGPT and Wanda calibrate on it: `texts` tokenized, joined (each followed by the
    tokenizer's end-of-sequence token) and cut into sequences of exactly `length` tokens, with no padding; the
    last, shorter piece is left out. Short texts such as paragraphs then give `length` real tokens per sequence instead
    of being padded to the longest one.

    Returns:
        `{"input_ids", "attention_mask"}`, `(sequences, length)` tensors, at most `max_sequences` sequences.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an integer >= 1; got {length!r}.")
    eos = tokenizer.eos_token_id
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    sequences = len(ids) // length if max_sequences is None else min(len(ids) // length, max_sequences)
    if sequences == 0:
        raise ValueError(f"the {len(texts)} text(s) hold {len(ids)} tokens, fewer than one sequence of {length}.")
    input_ids = torch.tensor(ids[: sequences * length]).view(sequences, length)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
