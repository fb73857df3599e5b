"""Synthetic SQuAD-format data for tests and the offline demo: generated facts with extractive questions about
them (`synthetic_squad`), and a WordPiece tokenizer built in code whose vocabulary covers them word for word
(`synthetic_tokenizer`). No download.
"""

from __future__ import annotations

import random
from typing import Any

_SYLLABLES = ["zor", "bia", "quel", "len", "mar", "tos", "vin", "dra", "kel", "pha", "ron", "sil", "tam", "wex", "yul"]
_JOBS = ["baker", "pilot", "farmer", "teacher", "ship builder", "doctor", "painter", "river guide", "miner", "poet"]
_FOODS = ["bread", "rice", "apples", "fish soup", "cheese", "honey", "plums", "green beans", "noodles", "figs"]
_INSTRUMENTS = ["violin", "drum", "flute", "harp", "piano", "trumpet", "guitar", "cello", "horn", "bass flute"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "gold"]


def _names(count: int, seed: int, suffix: str) -> list[str]:
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < count:
        name = ("".join(rng.sample(_SYLLABLES, 2)) + suffix).capitalize()
        if name not in names:
            names.append(name)
    return names


_COUNTRIES = _names(40, 1, "ia")
_CITIES = _names(40, 2, "")
_PEOPLE = _names(40, 3, "o")
_YEARS = [str(y) for y in range(1900, 2000, 3)]

# (statement, question, subject kind, answer pool)
_RELATIONS = [
    ("The capital of {s} is {a}.", "What is the capital of {s}?", _COUNTRIES, _CITIES),
    ("The flag of {s} is {a}.", "What color is the flag of {s}?", _COUNTRIES, _COLORS),
    ("{s} was born in {a}.", "When was {s} born?", _PEOPLE, _YEARS),
    ("{s} works as a {a}.", "What does {s} work as?", _PEOPLE, _JOBS),
    ("{s} lives in {a}.", "Where does {s} live?", _PEOPLE, _CITIES),
    ("The favorite food of {s} is {a}.", "What is the favorite food of {s}?", _PEOPLE, _FOODS),
    ("{s} plays the {a}.", "Which instrument does {s} play?", _PEOPLE, _INSTRUMENTS),
]


def synthetic_squad(
    num_paragraphs: int = 200,
    facts_per_paragraph: int = 5,
    questions_per_paragraph: int = 3,
    unanswerable_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """A synthetic SQuAD-format dataset of generated facts with extractive questions about them.

        Each paragraph states a few facts ("The capital of Zorbia is Quellen.", "Marvino works as a ship builder.");
        each question asks for one of them ("What is the capital of Zorbia?" -> "Quellen"). Several facts of the same
        relation share a paragraph, so a model must match the subject, not only the relation. With
        `unanswerable_fraction > 0`, that share of questions asks about a subject absent from the paragraph (SQuAD v2
        `is_impossible`). Same `seed`, same data. The vocabulary is small (see `synthetic_tokenizer`), so a tiny BERT
        trained from scratch on CPU learns it within minutes.

        Args:
            num_paragraphs (`int`, defaults to 200): paragraphs to generate.
            facts_per_paragraph (`int`, defaults to 5): sentences per paragraph.
            questions_per_paragraph (`int`, defaults to 3): questions per paragraph (at most `facts_per_paragraph`).
            unanswerable_fraction (`float`, defaults to 0.0): share of unanswerable questions (v2).
            seed (`int`, defaults to 0): random seed.

        Returns:
            `dict`: `{"version", "data": [{"title", "paragraphs": [{"context", "qas"}]}]}`, the official format
            (`squad_records` flattens it; `datasets.Dataset.from_list(squad_records(...))` makes a dataset).

        Example:

        ```python
        >>> from hf_sparse.squad.data import squad_records
    from hf_sparse.squad.synthetic import synthetic_squad
        >>> records = squad_records(synthetic_squad(num_paragraphs=2, seed=0))
        >>> records[0]["question"], records[0]["answers"]["text"]
        ```
    """
    if not 1 <= questions_per_paragraph <= facts_per_paragraph:
        raise ValueError(
            f"questions_per_paragraph must be between 1 and facts_per_paragraph ({facts_per_paragraph}); "
            f"got {questions_per_paragraph}."
        )
    if not 0.0 <= unanswerable_fraction <= 1.0:
        raise ValueError(f"unanswerable_fraction must be in [0, 1]; got {unanswerable_fraction}.")
    rng = random.Random(seed)
    paragraphs = []
    for p in range(num_paragraphs):
        sentences, facts, used = [], [], set()
        for _ in range(facts_per_paragraph):
            statement, question, subjects, answers = rng.choice(_RELATIONS)
            subject = rng.choice([s for s in subjects if (statement, s) not in used])
            used.add((statement, subject))
            answer = rng.choice(answers)
            facts.append((statement, question, subjects, subject, answer))
            sentences.append(statement.format(s=subject, a=answer))
        context, starts = "", []
        for (statement, _, _, subject, _), sentence in zip(facts, sentences):
            prefix = context + (" " if context else "")
            starts.append(len(prefix) + statement.replace("{s}", subject).index("{a}"))
            context = prefix + sentence
        qas = []
        for q, f in enumerate(rng.sample(range(facts_per_paragraph), questions_per_paragraph)):
            statement, question, subjects, subject, answer = facts[f]
            qid = f"syn-{seed}-{p}-{q}"
            if rng.random() < unanswerable_fraction:
                absent = [s for s in subjects if all(s != fact[3] for fact in facts)]
                qas.append(
                    {
                        "id": qid,
                        "question": question.format(s=rng.choice(absent)),
                        "answers": [],
                        "is_impossible": True,
                    }
                )
                continue
            start = starts[f]
            assert context[start : start + len(answer)] == answer
            qas.append(
                {
                    "id": qid,
                    "question": question.format(s=subject),
                    "answers": [{"text": answer, "answer_start": start}],
                    "is_impossible": False,
                }
            )
        paragraphs.append({"context": context, "qas": qas})
    return {"version": f"synthetic-{seed}", "data": [{"title": "synthetic facts", "paragraphs": paragraphs}]}


def synthetic_vocabulary() -> list[str]:
    """Every word and punctuation mark `synthetic_squad` can produce, lower-cased, sorted."""
    words = set()
    for statement, question, subjects, answers in _RELATIONS:
        for text in [statement, question, *subjects, *answers]:
            words.update(
                text.replace("{s}", " ").replace("{a}", " ").replace(".", " . ").replace("?", " ? ").lower().split()
            )
    return sorted(words)


def synthetic_tokenizer():
    """A fast uncased WordPiece (BERT) tokenizer whose vocabulary covers `synthetic_squad` word for word, built
    in code: no download. Other text tokenizes to `[UNK]` with correct offsets.

    Example:

    ```python
    >>> from hf_sparse.squad.synthetic import synthetic_tokenizer
    >>> tokenizer = synthetic_tokenizer()
    >>> tokenizer("What is the capital of Zorbia?").input_ids[:3]
    ```
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + synthetic_vocabulary())}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
    )
