"""SQuAD data: loading (Hub name or official JSON) and tokenization into model features (synthetic data is in
`hf_sparse.squad.synthetic`).

Training features (`prepare_train_features`) and validation features (`prepare_validation_features`) follow the
Hugging Face question-answering tutorial: question + context, only the context truncated, long contexts split into
several features of `max_length` tokens overlapping by `doc_stride`, and answer start/end token positions (the CLS
position, 0 for BERT, when the answer is not inside a feature). Validation features also keep `example_id` and an
`offset_mapping` restricted to the context (`[-1, -1]` elsewhere) for `hf_sparse.squad.postprocess`, and carry the gold
positions as labels so that the Trainer computes an evaluation loss and calls `compute_metrics`.

`datasets` is imported only by the functions that need it; everything else works on plain lists and dicts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# ------------------------------------------------------------------------------------------------------- loading


def squad_records(squad: Mapping[str, Any], source: str = "SQuAD data") -> list[dict[str, Any]]:
    """Flattens official SQuAD JSON (`{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}`) into one record
    per question, in the layout of the Hub's `squad` dataset: `id`, `title`, `context`, `question`,
    `answers = {"text": [...], "answer_start": [...]}` (empty lists for unanswerable v2 questions).

    Example:

    ```python
    >>> records = squad_records(json.load(open("dev-v1.1.json")))
    >>> records[0]["answers"]["text"][0]
    'Denver Broncos'
    ```
    """
    if not isinstance(squad, Mapping) or not isinstance(squad.get("data"), list):
        raise ValueError(f"{source}: expected the official SQuAD format, a dict with a 'data' list of articles.")
    records, seen = [], set()
    for a, article in enumerate(squad["data"]):
        if not isinstance(article, Mapping) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"{source}: data[{a}] must be a dict with a 'paragraphs' list.")
        title = article.get("title", "")
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"{source}: data[{a}]['paragraphs'][{p}]"
            if not isinstance(paragraph, Mapping) or not isinstance(paragraph.get("context"), str):
                raise ValueError(f"{where} must be a dict with a 'context' string.")
            if not isinstance(paragraph.get("qas"), list):
                raise ValueError(f"{where} must have a 'qas' list.")
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                if not isinstance(qa, Mapping) or not isinstance(qa.get("id"), str):
                    raise ValueError(f"{where}: every question needs a string 'id'; got {qa!r:.200}.")
                qid = qa["id"]
                if qid in seen:
                    raise ValueError(f"{source}: question id {qid!r} appears more than once.")
                seen.add(qid)
                if not isinstance(qa.get("question"), str) or not isinstance(qa.get("answers"), list):
                    raise ValueError(f"{source}: question {qid!r} needs a 'question' string and an 'answers' list.")
                texts, starts = [], []
                for answer in qa["answers"]:
                    if not isinstance(answer, Mapping) or "text" not in answer or "answer_start" not in answer:
                        raise ValueError(
                            f"{source}: question {qid!r}: each answer must be {{'text': str, 'answer_start': int}}; "
                            f"got {answer!r:.200}."
                        )
                    texts.append(answer["text"])
                    starts.append(answer["answer_start"])
                check_example(qid, qa["question"], context, {"text": texts, "answer_start": starts}, source)
                if not texts and not qa.get("is_impossible", False):
                    raise ValueError(f"{source}: question {qid!r} has no answers and is not marked 'is_impossible'.")
                records.append(
                    {
                        "id": qid,
                        "title": title,
                        "context": context,
                        "question": qa["question"],
                        "answers": {"text": texts, "answer_start": starts},
                    }
                )
    return records


def check_example(qid: str, question: Any, context: Any, answers: Any, source: str = "examples") -> None:
    """Checks one SQuAD question where it is read, so that a bad record fails with its file, id and field instead of
    training on a wrong label: a non-empty question and context, and answers whose `answer_start` is an int
    (not a bool) that points, inside the context, at exactly the answer's text.

    Raises:
        ValueError: naming `source`, the question id and the field at fault.
    """
    where = f"{source}: question {qid!r}"
    for field_name, value in (("question", question), ("context", context)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: {field_name!r} must be a str; got {type(value).__name__}.")
        if not value.strip():
            raise ValueError(f"{where}: {field_name!r} is empty; every question needs a question text and a context.")
    if not isinstance(answers, Mapping) or "text" not in answers or "answer_start" not in answers:
        raise ValueError(f"{where}: 'answers' must be {{'text': [...], 'answer_start': [...]}}; got {answers!r:.200}.")
    texts, starts = answers["text"], answers["answer_start"]
    if isinstance(texts, str) or isinstance(starts, str) or len(texts) != len(starts):
        raise ValueError(
            f"{where}: answers 'text' and 'answer_start' must be lists of the same length; got {answers!r:.200}."
        )
    for i, (text, start) in enumerate(zip(texts, starts)):
        field_name = f"answers[{i}]"
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: {field_name} 'text' must be a non-empty str; got {text!r:.100}.")
        if isinstance(start, bool) or not isinstance(start, int):
            raise ValueError(
                f"{where}: {field_name} 'answer_start' must be an int (a character offset); got {start!r} "
                f"({type(start).__name__})."
            )
        if not 0 <= start <= len(context) - len(text):
            raise ValueError(
                f"{where}: {field_name} 'answer_start' {start} is outside the context: the answer "
                f"{text!r:.60} ({len(text)} characters) must start between 0 and {len(context) - len(text)}."
            )
        found = context[start : start + len(text)]
        if found != text:
            raise ValueError(
                f"{where}: {field_name} 'answer_start' {start} points at {found!r:.60} in the context, not at the "
                f"answer {text!r:.60}; fix the offset (the first occurrence is at {context.find(text)})."
            )


def read_squad_json(path: str | Path) -> list[dict[str, Any]]:
    """Reads a SQuAD file in the official JSON format (v1.1 or v2.0) into records (see `squad_records`)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); SQuAD JSON files are UTF-8. Convert it, "
            "e.g. with iconv -f <encoding> -t utf-8."
        ) from None
    try:
        squad = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected a SQuAD file in the official format.") from err
    return squad_records(squad, source=str(path))


def load_squad(name_or_path: str | Path = "squad", split: str = "validation"):
    """Loads SQuAD as a `datasets.Dataset`: a local file in the official JSON format (any `split` ignored), or a
    dataset of the Hub (`"squad"`, `"squad_v2"`, ...) through `datasets.load_dataset`, which needs the network.

    Args:
        name_or_path (`str` or `Path`, defaults to `"squad"`): a path to a `.json` file or a Hub dataset name.
        split (`str`, defaults to `"validation"`): the split to load from the Hub.

    Example:

    ```python
    >>> from hf_sparse.squad.data import load_squad
    >>> examples = load_squad("../shared/data/squad/xquad-en.json")
    >>> examples.num_rows
    1190
    ```
    """
    import datasets

    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"{path} does not exist; pass an existing SQuAD JSON file or a Hub name such as 'squad'.")
        return datasets.Dataset.from_list(read_squad_json(path))
    return datasets.load_dataset(str(name_or_path), split=split)


# --------------------------------------------------------------------------------------------------- tokenization


def _columns(examples: Any, needed: Sequence[str]) -> dict[str, list]:
    """A batch as a dict of columns (what `Dataset.map(batched=True)` passes), from columns or a list of dicts."""
    if isinstance(examples, Mapping):
        batch = examples
    elif isinstance(examples, Sequence) and not isinstance(examples, (str, bytes)):
        batch = {}
        for i, row in enumerate(examples):
            if not isinstance(row, Mapping):
                raise ValueError(f"examples[{i}] must be a dict; got {type(row).__name__}.")
            for key in needed:
                if key not in row:
                    raise ValueError(f"examples[{i}] (id {row.get('id')!r}) has no {key!r} key.")
        batch = {key: [row[key] for row in examples] for key in needed}
    else:
        raise ValueError(f"examples must be a dict of columns or a list of dicts; got {type(examples).__name__}.")
    for key in needed:
        if key not in batch:
            raise ValueError(f"examples have no {key!r} column (columns: {sorted(batch)}); expected {list(needed)}.")
    return batch


def _tokenize(batch: Mapping[str, list], tokenizer, max_length: int, doc_stride: int):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; SQuAD features need offset mappings, which only fast "
            "(Rust) tokenizers provide. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    if doc_stride >= max_length:
        raise ValueError(f"doc_stride ({doc_stride}) must be smaller than max_length ({max_length}).")
    for i, qid in enumerate(batch["id"]):
        answers = batch["answers"][i] if "answers" in batch else {"text": [], "answer_start": []}
        check_example(qid, batch["question"][i], batch["context"][i], answers)
    pad_on_right = tokenizer.padding_side == "right"
    # Leading spaces in questions waste tokens and can push the context out of the window.
    questions = [q.lstrip() for q in batch["question"]]
    contexts = batch["context"]
    _check_room(batch["id"], questions, tokenizer, max_length, doc_stride)

    def encode(q, c):
        return tokenizer(
            q if pad_on_right else c,
            c if pad_on_right else q,
            truncation="only_second" if pad_on_right else "only_first",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length",
        )

    try:
        encoded = encode(questions, contexts)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # the Rust tokenizer panics with a BaseException that names no example
        for qid, q, c in zip(batch["id"], questions, contexts):
            try:
                encode([q], [c])
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:
                raise ValueError(
                    f"question {qid!r} cannot be tokenized with max_length={max_length}, doc_stride={doc_stride} "
                    f"({type(err).__name__}: {str(err).splitlines()[0]:.200}); raise max_length, lower doc_stride, "
                    "or leave the question out."
                ) from None
        raise
    return encoded, (1 if pad_on_right else 0)


def _question_tokens(tokenizer, questions: list[str]) -> list[int]:
    """Tokens of each question, special tokens left out."""
    return [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]


def _context_room(tokenizer, question_tokens: int, max_length: int) -> int:
    """Context tokens a feature of `max_length` holds beside a question of `question_tokens` tokens: the one rule
    that `_check_room` (per question, while tokenizing) and `check_squad_inputs` (the longest, before training)
    apply. More than `doc_stride` are needed to split a long context into overlapping windows."""
    return max_length - question_tokens - tokenizer.num_special_tokens_to_add(pair=True)


def _check_room(ids: list, questions: list[str], tokenizer, max_length: int, doc_stride: int) -> None:
    """Each window holds the question, the special tokens and `max_length - those` context tokens, and windows of
    one context overlap by `doc_stride` tokens, so a question must leave more than `doc_stride` context tokens.
    (The Rust tokenizer would otherwise fail with a panic or a truncation error that names no question.)"""
    special = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = _question_tokens(tokenizer, questions)
    for qid, length in zip(ids, lengths):
        room = _context_room(tokenizer, length, max_length)
        if room <= doc_stride:
            raise ValueError(
                f"question {qid!r} has {length} tokens: with {special} special tokens it leaves {max(room, 0)} "
                f"context tokens per window of max_length={max_length}, and doc_stride={doc_stride} needs more "
                f"than that. Raise max_length, lower doc_stride below {max(room, 1)}, or leave the question out."
            )


def _answer_positions(encoded, batch, context_index: int, tokenizer) -> tuple[list[int], list[int]]:
    """Start/end token positions of the first gold answer in each feature; the CLS position when it is outside."""
    starts, ends = [], []
    cls_id = tokenizer.cls_token_id
    for f, offsets in enumerate(encoded["offset_mapping"]):
        input_ids = encoded["input_ids"][f]
        cls_index = input_ids.index(cls_id) if cls_id is not None and cls_id in input_ids else 0
        e = encoded["overflow_to_sample_mapping"][f]
        answers = batch["answers"][e]
        if not isinstance(answers, Mapping) or "text" not in answers or "answer_start" not in answers:
            raise ValueError(
                f"example {batch['id'][e]!r}: 'answers' must be {{'text': [...], 'answer_start': [...]}}; got {answers!r}."
            )
        if len(answers["answer_start"]) == 0:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        sequence_ids = encoded.sequence_ids(f)
        token_start = 0
        while sequence_ids[token_start] != context_index:
            token_start += 1
        token_end = len(input_ids) - 1
        while sequence_ids[token_end] != context_index:
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            starts.append(cls_index)  # the answer is not (fully) inside this feature
            ends.append(cls_index)
            continue
        # Walk only over context tokens: the [SEP] and padding after them have offsets (0, 0).
        first, last = token_start, token_end
        while token_start <= last and offsets[token_start][0] <= start_char:
            token_start += 1
        while token_end >= first and offsets[token_end][1] >= end_char:
            token_end -= 1
        starts.append(token_start - 1)
        ends.append(token_end + 1)
    return starts, ends


def prepare_train_features(examples: Any, tokenizer, max_length: int = 384, doc_stride: int = 128) -> dict[str, list]:
    """Tokenizes SQuAD examples into training features with `start_positions` / `end_positions`.

    Works as a batched `datasets.Dataset.map` function and on plain lists of example dicts. Each example can give
    several features (long contexts); a feature that does not contain the (first) gold answer, or an unanswerable
    v2 question, gets the CLS position for both.

    Args:
        examples: a batch (dict of columns) or a list of dicts with `id`, `question`, `context`, `answers`.
        tokenizer: any fast tokenizer (`PreTrainedTokenizerFast`).
        max_length (`int`, defaults to 384): tokens per feature.
        doc_stride (`int`, defaults to 128): tokens of overlap between consecutive features of one context.

    Returns:
        `dict[str, list]`: the tokenizer's columns (`input_ids`, `attention_mask`, ...), `start_positions`,
        `end_positions`.

    Example:

    ```python
    >>> train = examples.map(prepare_train_features, batched=True, remove_columns=examples.column_names,
    ...                      fn_kwargs={"tokenizer": tokenizer})
    ```
    """
    batch = _columns(examples, ("id", "question", "context", "answers"))
    encoded, context_index = _tokenize(batch, tokenizer, max_length, doc_stride)
    starts, ends = _answer_positions(encoded, batch, context_index, tokenizer)
    features = {k: v for k, v in encoded.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
    features["start_positions"] = starts
    features["end_positions"] = ends
    return features


def prepare_validation_features(
    examples: Any, tokenizer, max_length: int = 384, doc_stride: int = 128, with_labels: bool | None = None
) -> dict[str, list]:
    """Tokenizes SQuAD examples into evaluation features for `hf_sparse.squad.postprocess` and the Trainer.

    Args:
        examples: a batch (dict of columns) or a list of dicts with `id`, `question`, `context` (and `answers`).
        tokenizer: any fast tokenizer.
        max_length (`int`, defaults to 384): tokens per feature.
        doc_stride (`int`, defaults to 128): tokens of overlap between consecutive features of one context.
        with_labels (`bool`, *optional*): add `start_positions` / `end_positions` (as in training). Default: when
            the examples have `answers`. With labels the Trainer reports `eval_loss` and calls `compute_metrics`.

    Returns:
        `dict[str, list]`: the tokenizer's columns, `example_id`, `offset_mapping` (`[-1, -1]` outside the context)
        and, with labels, `start_positions` / `end_positions`.

    Example:

    ```python
    >>> features = examples.map(prepare_validation_features, batched=True, remove_columns=examples.column_names,
    ...                         fn_kwargs={"tokenizer": tokenizer})
    ```
    """
    needed = ["id", "question", "context"]
    has_answers = (isinstance(examples, Mapping) and "answers" in examples) or (
        isinstance(examples, Sequence)
        and len(examples) > 0
        and isinstance(examples[0], Mapping)
        and "answers" in examples[0]
    )
    if with_labels is None:
        with_labels = has_answers
    if with_labels:
        needed.append("answers")
    batch = _columns(examples, needed)
    encoded, context_index = _tokenize(batch, tokenizer, max_length, doc_stride)
    features = {k: v for k, v in encoded.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
    if with_labels:
        features["start_positions"], features["end_positions"] = _answer_positions(
            encoded, batch, context_index, tokenizer
        )
    features["example_id"] = [batch["id"][e] for e in encoded["overflow_to_sample_mapping"]]
    features["offset_mapping"] = [
        [list(o) if s == context_index else [-1, -1] for o, s in zip(offsets, encoded.sequence_ids(f))]
        for f, offsets in enumerate(encoded["offset_mapping"])
    ]
    return features


def _split_columns(records: Any, needed: Sequence[str]) -> dict[str, list]:
    if hasattr(records, "column_names"):  # datasets.Dataset
        return {key: records[key] for key in needed}
    return _columns(records, needed)


def check_squad_inputs(
    tokenizer,
    examples: dict[str, Any],
    max_length: int,
    doc_stride: int,
    max_position_embeddings: int | None = None,
    version_2_with_negative: bool = False,
) -> dict[str, int]:
    """Checks the tokenizer and the data against `max_length` / `doc_stride` before any training, and fails with
    what to change instead of a tokenizer panic or a metric error after training.

    Checks: the tokenizer is fast (offset mappings); `max_length` fits the tokenizer's `model_max_length` and the
    model's `max_position_embeddings`; the longest question leaves more than `doc_stride` context tokens in a
    feature (else the tokenizer cannot split long contexts into overlapping windows); every split has questions;
    and without `version_2_with_negative`, evaluation questions all have answers.

    Args:
        tokenizer: the fast tokenizer the features will be built with.
        examples: records by split name, e.g. `{"train": train, "validation": validation}` (lists of dicts or
            `datasets.Dataset`s with `id`, `question`, `context`, `answers`).
        max_length, doc_stride: the feature length and window overlap to check.
        max_position_embeddings: the model's limit, when known.
        version_2_with_negative: whether questions without answers are expected.

    Returns:
        `dict[str, int]`: `longest_question_tokens` and `context_tokens_per_feature`.

    Example:

    ```python
    >>> check_squad_inputs(tokenizer, {"train": train, "validation": dev}, max_length=384, doc_stride=128)
    {'longest_question_tokens': 40, 'context_tokens_per_feature': 341}
    ```
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; SQuAD features need offset mappings, which only "
            "fast (Rust) tokenizers provide. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    limits = {"the tokenizer's model_max_length": getattr(tokenizer, "model_max_length", None)}
    limits["the model's max_position_embeddings"] = max_position_embeddings
    for what, limit in limits.items():
        if limit is not None and limit < 1_000_000 and max_length > limit:
            raise ValueError(f"--max_seq_length {max_length} exceeds {what} ({limit}); pass at most {limit}.")
    if not 0 < doc_stride < max_length:
        raise ValueError(f"--doc_stride must be in (0, --max_seq_length={max_length}); got {doc_stride}.")
    longest, longest_id = 0, None
    for split, records in examples.items():
        if not len(records):
            raise ValueError(f"the {split} data has no questions.")
        columns = _split_columns(records, ("id", "question"))
        questions = [q.lstrip() for q in columns["question"]]
        lengths = _question_tokens(tokenizer, questions)
        i = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[i] > longest:
            longest, longest_id = lengths[i], f"{split} question {columns['id'][i]!r}"
        if split != "train" and not version_2_with_negative:
            answers = _split_columns(records, ("answers",))["answers"]
            empty = [columns["id"][j] for j, a in enumerate(answers) if not a["text"]]
            if empty:
                raise ValueError(
                    f"{len(empty)} {split} question(s) have no answer (first: {empty[0]!r}): pass "
                    "--version_2_with_negative for SQuAD v2 data, or evaluate on answerable questions only."
                )
    room = _context_room(tokenizer, longest, max_length)
    if room <= doc_stride:
        raise ValueError(
            f"the longest question ({longest_id}, {longest} tokens) leaves {room} context tokens per feature at "
            f"--max_seq_length {max_length}, not more than --doc_stride {doc_stride}: long contexts cannot be split "
            f"into overlapping windows. Raise --max_seq_length (384 is usual for SQuAD) or lower --doc_stride below "
            f"{max(room, 1)}."
        )
    return {"longest_question_tokens": longest, "context_tokens_per_feature": room}


def tokenize_squad(examples: Any, tokenizer, train: bool, max_length: int = 384, doc_stride: int = 128) -> Any:
    """Features for a whole split: a `datasets.Dataset` from a `datasets.Dataset`, or a `QAFeatures` (torch
    dataset) from a list of example dicts (no `datasets` needed).

    Example:

    ```python
    >>> train_features = tokenize_squad(train_examples, tokenizer, train=True)
    >>> eval_features = tokenize_squad(eval_examples, tokenizer, train=False)
    ```
    """
    fn = prepare_train_features if train else prepare_validation_features
    kwargs = {"tokenizer": tokenizer, "max_length": max_length, "doc_stride": doc_stride}
    if hasattr(examples, "map") and hasattr(examples, "column_names"):
        return examples.map(fn, batched=True, remove_columns=examples.column_names, fn_kwargs=kwargs)
    return QAFeatures(fn(list(examples), **kwargs))


class QAFeatures(torch.utils.data.Dataset):
    """A dict of feature columns as a torch dataset: numeric columns come back as tensors, others as they are
    (the Trainer drops `example_id` / `offset_mapping` before collating, as they are no model inputs).

    It also answers `column_names` and `__getitem__(column name)`, so `SquadPostprocessor` and
    `squad_compute_metrics` accept it like a `datasets.Dataset`.
    """

    _TENSOR_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")

    def __init__(self, columns: Mapping[str, list]):
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"QAFeatures: columns have different lengths: {lengths}.")
        self.columns = dict(columns)
        self._len = next(iter(lengths.values()), 0)

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return {k: torch.tensor(v[key]) if k in self._TENSOR_COLUMNS else v[key] for k, v in self.columns.items()}


# -- unanswerable questions as distillation inputs ---------------------------------------------------------------------


def split_unanswerable(examples: Any) -> tuple[Any, Any]:
    """(questions with an answer, questions without one) of a list of example dicts or a `datasets.Dataset`.

    A SQuAD v1.1 model has no "no answer": trained on an unanswerable question it would learn to point at `[CLS]`.
    Its inputs still carry what a distilled student should learn from the teacher (see `distillation_features`)."""
    if hasattr(examples, "filter") and hasattr(examples, "column_names"):
        return examples.filter(lambda r: len(r["answers"]["text"]) > 0), examples.filter(
            lambda r: len(r["answers"]["text"]) == 0
        )
    examples = list(examples)
    return [r for r in examples if r["answers"]["text"]], [r for r in examples if not r["answers"]["text"]]


def distillation_features(features: Any, max_length: int) -> Any:
    """Training features whose answer positions a question-answering head's loss ignores (positions equal to the
    sequence length: transformers' QA heads pass them as `ignore_index`), for inputs that only distillation learns
    from: with `DistillationLoss(task_weight=...)` the task term then comes from the other features of a batch.

    Example:

    ```python
    >>> answered, unanswered = split_unanswerable(train_examples)
    >>> extra = distillation_features(tokenize_squad(unanswered, tokenizer, train=True), 384)
    >>> recovery_set = concatenate_features(tokenize_squad(answered, tokenizer, train=True), extra)
    ```
    """
    ignored = [max_length] * len(features)
    if hasattr(features, "map") and hasattr(features, "column_names"):
        features = features.remove_columns(["start_positions", "end_positions"])
        return features.add_column("start_positions", ignored).add_column("end_positions", ignored)
    columns = dict(features.columns, start_positions=ignored, end_positions=list(ignored))
    return QAFeatures(columns)


def concatenate_features(first: Any, second: Any) -> Any:
    """Two sets of training features as one (`QAFeatures`, or `datasets.Dataset`s with the same columns)."""
    if isinstance(first, QAFeatures) and isinstance(second, QAFeatures):
        missing = set(first.column_names) ^ set(second.column_names)
        if missing:
            raise ValueError(f"features to concatenate have different columns: {sorted(missing)}.")
        return QAFeatures({k: list(first[k]) + list(second[k]) for k in first.column_names})
    import datasets

    return datasets.concatenate_datasets([first, second.cast(first.features)])
