"""How fast and how faithfully a causal LM generates: new tokens per second of `model.generate()`, measured the same
way for a dense model and its 2:4 copy on sparse kernels, and how many greedy generations two models share.

`GenerationSettings` is how `generate()` runs, handed unchanged to every model compared. By default it is the fast
path for decoding: transformers' static KV cache (fixed shapes, so the decode step can be compiled) with the decode
step compiled by `torch.compile(mode="reduce-overhead")` (inductor, then CUDA graphs; transformers compiles it itself
when the cache is static and the model is on a GPU). The prefill runs eagerly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._model import evaluating, input_device, pad_id_of

CACHES = ("static", "dynamic")
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class GenerationSettings:
    """How `generate()` runs: give the same object to the dense baseline and the 2:4 model so that both get it.

    Args:
        cache: "static" (transformers' `StaticCache`, `cache_implementation="static"`: preallocated for prompt plus
            new tokens, the same shapes at every decode step) or "dynamic" (the default cache, grown every step).
        compile_mode: `torch.compile` mode of the decode step, or None to run it eagerly. "reduce-overhead" (default)
            is inductor with CUDA graphs: one graph replay per new token. Needs `cache="static"` (transformers
            compiles only then).
        compile_backend: the `torch.compile` backend ("inductor"; "eager" or "aot_eager" to check the tracing
            without inductor).
        compile_on_cpu: also compile on the CPU (transformers compiles the decode step only on accelerators; tests).

    Example:

    ```python
    >>> settings = GenerationSettings()   # static cache, decode step under torch.compile(mode="reduce-overhead")
    >>> out = model.generate(**inputs, max_new_tokens=256, **settings.generate_kwargs())
    ```
    """

    cache: str = "static"
    compile_mode: str | None = "reduce-overhead"
    compile_backend: str = "inductor"
    compile_on_cpu: bool = False

    def __post_init__(self):
        if self.cache not in CACHES:
            raise ValueError(f"GenerationSettings.cache must be one of {list(CACHES)}; got {self.cache!r}.")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"GenerationSettings.compile_mode must be one of {list(COMPILE_MODES)} or None (eager decode); got "
                f"{self.compile_mode!r}."
            )
        if self.compile_mode is not None and self.cache != "static":
            raise ValueError(
                "GenerationSettings.compile_mode needs cache='static': transformers compiles the decode step only with "
                f"a static cache; got cache={self.cache!r}. Pass compile_mode=None for an eager decode."
            )

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate()` that apply these settings (a `CompileConfig` when compiling)."""
        from transformers import CompileConfig

        if self.compile_mode is None:
            kwargs: dict = {"disable_compile": True}
        else:
            # fullgraph=False: a model whose layers break the graph still runs; dynamic=False: one graph per batch size
            mode = self.compile_mode if self.compile_backend == "inductor" else None  # modes are inductor's
            config = CompileConfig(fullgraph=False, dynamic=False, backend=self.compile_backend, mode=mode)
            config._compile_all_devices = self.compile_on_cpu or None  # in CompileConfig for this (transformers 5.x)
            kwargs = {"compile_config": config}
        if self.cache == "static":
            kwargs["cache_implementation"] = "static"
        return kwargs


@dataclass(frozen=True)
class GenerationSpeed:
    """New tokens per second of greedy `generate()` at one batch size.

    Attributes:
        tokens_per_second: batch_size x new_tokens / seconds.
        seconds: the median time of one `generate()` call over `repeats` (after one untimed warm-up call).
        batch_size, prompt_tokens, new_tokens: every row is a prompt of exactly `prompt_tokens` tokens continued by
            exactly `new_tokens` (end of sequence is ignored), so that each call does the same work.
        repeats: timed calls.
        settings: the `GenerationSettings` used (as a dict), or None for the model's own generation config.
        decode_compiled: whether transformers ran the decode step through its compiled call (None: not known, when
            no settings were given).
    """

    tokens_per_second: float
    seconds: float
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    settings: dict | None = None
    decode_compiled: bool | None = None


def generation_speed(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    repeats: int = 3,
    settings: GenerationSettings | None = None,
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
        settings: how `generate()` runs (`GenerationSettings`: static cache and a compiled decode step by default);
            None: as the model's generation config says.

    Example:

    ```python
    >>> from hf_sparse.lm.generation import GenerationSettings, generation_speed
    >>> print(generation_speed(model, tokenizer, paragraphs, batch_size=8, settings=GenerationSettings()).tokens_per_second)
    ```
    """
    _check_positive(batch_size=batch_size, prompt_tokens=prompt_tokens)
    stream = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    if len(stream) < batch_size * prompt_tokens:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than batch_size x prompt_tokens = "
                         f"{batch_size * prompt_tokens}; pass more text or shorter prompts.")  # fmt: skip
    input_ids = torch.tensor(stream[: batch_size * prompt_tokens]).view(batch_size, prompt_tokens)
    return time_generation(model, input_ids, new_tokens, repeats, settings, pad_id_of(tokenizer))


def time_generation(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int = 128,
    repeats: int = 3,
    settings: GenerationSettings | None = None,
    pad_token_id: int = 0,
) -> GenerationSpeed:
    """Times greedy `model.generate()` continuing every row of `input_ids` (batch x prompt tokens, no padding) by
    exactly `new_tokens` tokens: the median of `repeats` calls after one untimed warm-up call (kernel selection,
    compilation, CUDA graph capture). See `generation_speed`, which cuts the prompts from text."""
    _check_positive(new_tokens=new_tokens, repeats=repeats)
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty batch x tokens tensor; got shape {tuple(input_ids.shape)}.")
    device = input_device(model)
    input_ids = input_ids.to(device)
    batch_size, prompt_tokens = input_ids.shape
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id)  # fmt: skip
    if settings is not None:
        kwargs.update(settings.generate_kwargs())
        if settings.compile_mode is not None:
            allow_recompiles()
    times = []
    with evaluating(model):
        for call in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            out = model.generate(**kwargs)
            _synchronize(device)
            if call:  # the first call warms up (kernel selection, caches, lazy initialisation, compilation)
                times.append(time.perf_counter() - start)
            if out.shape != (batch_size, prompt_tokens + new_tokens):
                raise RuntimeError(f"generate() returned {tuple(out.shape)}, not {batch_size} rows of "
                                   f"{prompt_tokens + new_tokens} tokens.")  # fmt: skip
    seconds = statistics.median(times)
    compiled = None if settings is None else decode_compiled(model)
    return GenerationSpeed(batch_size * new_tokens / seconds, seconds, batch_size, prompt_tokens, new_tokens, repeats,
                           None if settings is None else asdict(settings), compiled)  # fmt: skip


def decode_compiled(model: nn.Module) -> bool:
    """Whether transformers has compiled `model`'s decode step (`generate()` keeps the compiled call on the model; it
    skips compiling, for instance, on the CPU or for a quantizer that says it cannot be compiled)."""
    return model.__dict__.get("_compiled_call") is not None


def allow_recompiles(limit: int = 64) -> None:
    """Raises dynamo's recompile limit to at least `limit`. transformers compiles `nn.Module.__call__`, one code
    object for every model: each model and batch size compared compiles it again, and past the default limit (8)
    dynamo would run the rest eagerly without saying so in the timings."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


# -- greedy agreement ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GreedyAgreement:
    """How many greedy generations of a model equal a reference model's, prompt by prompt.

    Attributes:
        identical: prompts whose new tokens (up to and including the end of sequence) are the same.
        prompts: prompts compared.
        new_tokens: the most tokens generated per prompt.
        first_difference: per prompt, the position of the first new token that differs (None: identical).
    """

    identical: int
    prompts: int
    new_tokens: int
    first_difference: list[int | None]


def prompt_ids(tokenizer, texts: Sequence[str], chat_template: bool | None = None) -> list[list[int]]:
    """Each text as token ids: wrapped as a user message in the tokenizer's chat template (with the assistant's turn
    opened) when it has one and `chat_template` is not False, else encoded as it is."""
    from .data import _encode_prompt

    if chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "chat_template=True but the tokenizer has no chat template; pass chat_template=None or False."
        )
    use = getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    return [_encode_prompt(tokenizer, text, use) for text in texts]


def greedy_generations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int = 32,
    pad_token_id: int = 0,
    settings: GenerationSettings | None = None,
) -> list[list[int]]:
    """Greedy `generate()` of each prompt alone (batch 1: no padding to change the numerics): its new tokens, up to
    and including the first end of sequence."""
    from .data import _stop_ids, _until_stop

    _check_positive(new_tokens=new_tokens)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists.")
    device = input_device(model)
    stops = _stop_ids(model, _NoTokenizer)
    extra = settings.generate_kwargs() if settings is not None else {}
    generated = []
    with evaluating(model):
        for ids in prompts:
            input_ids = torch.tensor([list(ids)], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=pad_token_id, **extra)  # fmt: skip
            generated.append(_until_stop(out[0, len(ids) :].tolist(), stops))
    return generated


def greedy_agreement(
    model: nn.Module,
    reference: nn.Module | Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    new_tokens: int = 32,
    pad_token_id: int = 0,
    settings: GenerationSettings | None = None,
) -> GreedyAgreement:
    """Counts the prompts whose greedy generation by `model` (e.g. swapped to 2:4 kernels) is identical to the
    reference's (e.g. the masked dense model's), over at most `new_tokens` new tokens, each prompt alone.

    Args:
        model: the model to check.
        reference: the reference model, or its generations (`greedy_generations` of the same prompts), to compare
            several models with one reference run.
        prompts: token ids per prompt (`prompt_ids` makes them from text).
        new_tokens: the most new tokens per prompt.
        pad_token_id: passed to `generate()` (nothing is padded).
        settings: how both models generate; None: eagerly with the default cache.

    Example:

    ```python
    >>> prompts = prompt_ids(tokenizer, questions[:50])
    >>> agreement = greedy_agreement(swapped, masked_dense, prompts, new_tokens=32)
    >>> print(f"{agreement.identical} of {agreement.prompts} identical")
    ```
    """
    if isinstance(reference, nn.Module):
        reference = greedy_generations(reference, prompts, new_tokens, pad_token_id, settings)
    if len(reference) != len(prompts):
        raise ValueError(f"reference holds {len(reference)} generations for {len(prompts)} prompts.")
    ours = greedy_generations(model, prompts, new_tokens, pad_token_id, settings)
    differences = [_first_difference(a, b) for a, b in zip(ours, reference)]
    return GreedyAgreement(sum(d is None for d in differences), len(prompts), new_tokens, differences)


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


class _NoTokenizer:
    eos_token_id = None  # the stop tokens come from the model's generation config


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
