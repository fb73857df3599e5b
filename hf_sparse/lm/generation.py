"""How fast a causal LM generates: new tokens per second of `model.generate()`, measured the same way for a dense
model and its 2:4 copy on sparse kernels."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._model import evaluating, input_device, pad_id_of


@dataclass(frozen=True)
class GenerationSpeed:
    """New tokens per second of greedy `generate()` at one batch size.

    Attributes:
        tokens_per_second: batch_size x new_tokens / seconds.
        seconds: the median time of one `generate()` call over `repeats` (after one untimed warm-up call).
        batch_size, prompt_tokens, new_tokens: every row is a prompt of exactly `prompt_tokens` tokens continued by
            exactly `new_tokens` (end of sequence is ignored), so that each call does the same work.
        repeats: timed calls.
    """

    tokens_per_second: float
    seconds: float
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    repeats: int


def generation_speed(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    repeats: int = 3,
) -> GenerationSpeed:
    """Times greedy `model.generate()` on prompts cut from `texts`: their tokens, joined end to end, cut into
    `batch_size` rows of `prompt_tokens` (no padding), each continued by exactly `new_tokens` tokens. On a GPU the
    device is synchronized around each call. The model is put in eval mode and back afterwards.

    Args:
        model: an `AutoModelForCausalLM`, on the device to time (e.g. swapped to 2:4 kernels).
        tokenizer: its tokenizer.
        texts: text to cut the prompts from (at least batch_size x prompt_tokens tokens in all).
        batch_size: rows per call.
        prompt_tokens: tokens of each prompt.
        new_tokens: tokens generated per row.
        repeats: timed calls (the median is reported).

    Example:

    ```python
    >>> from hf_sparse.lm.generation import generation_speed
    >>> print(generation_speed(model, tokenizer, paragraphs, batch_size=8).tokens_per_second)
    ```
    """
    for name, value in (("batch_size", batch_size), ("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens),
                        ("repeats", repeats)):  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
    stream = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    if len(stream) < batch_size * prompt_tokens:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than batch_size x prompt_tokens = "
                         f"{batch_size * prompt_tokens}; pass more text or shorter prompts.")  # fmt: skip
    device = input_device(model)
    input_ids = torch.tensor(stream[: batch_size * prompt_tokens], device=device).view(batch_size, prompt_tokens)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id_of(tokenizer))  # fmt: skip
    times = []
    with evaluating(model):
        for call in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            out = model.generate(**kwargs)
            _synchronize(device)
            if call:  # the first call warms up (kernel selection, caches, lazy initialisation)
                times.append(time.perf_counter() - start)
            if out.shape != (batch_size, prompt_tokens + new_tokens):
                raise RuntimeError(f"generate() returned {tuple(out.shape)}, not {batch_size} rows of "
                                   f"{prompt_tokens + new_tokens} tokens.")  # fmt: skip
    seconds = statistics.median(times)
    return GenerationSpeed(batch_size * new_tokens / seconds, seconds, batch_size, prompt_tokens, new_tokens, repeats)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
