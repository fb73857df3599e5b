"""Running a model's forward pass as CUDA graphs, one per input signature (batch size, sequence length, ...).

A BERT-base forward launches hundreds of kernels, and eager PyTorch spends host time on each; a swapped layer's
cuSPARSELt call costs more host time than a dense one even with its plan kept (`cusparselt.py`). Captured once
per input shape and replayed, the whole forward costs one launch. `cuda_graphs(model)` does it for any model;
`EagerGraphs` is what a swapped model installs as its own forward, so its plain inference calls are graphed.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

GENERATION = [0]
"""Bumped whenever a swapped layer's tensors move (`.to()`, `.half()`, ...): graphs captured before read the old
memory, so a model's automatic graphs (`EagerGraphs`) are dropped when it changes."""


@dataclass
class _Captured:
    graph: object
    static_args: list
    static_kwargs: dict
    output: object


def _signature(value, tensors: list | None = None):
    """A hashable description of an argument: its shape/dtype/device for a tensor, its value otherwise (`tensors`,
    if given, collects the tensors met)."""
    if isinstance(value, torch.Tensor):
        if tensors is not None:
            tensors.append(value)
        return ("tensor", tuple(value.shape), value.dtype, value.device.type, value.device.index)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v, tensors) for v in value))
    if isinstance(value, Mapping):
        return ("map", tuple((k, _signature(v, tensors)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"cuda_graphs: cannot key a graph on an argument of type {type(value).__name__}; pass tensors, "
            "numbers, strings, booleans or None."
        ) from None
    return ("value", value)


_PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _plain(value) -> bool:
    """Whether a graph can take `value` as input or give it back as output: tensors, and numbers, strings, dtypes and
    None, in lists, tuples and dicts (transformers' ModelOutput included). Objects such as a KV cache are not: a
    graph would change them at capture and share them between calls."""
    if isinstance(value, (torch.Tensor, *_PLAIN_VALUES)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _static_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_static_copy(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _static_copy(v) for k, v in value.items()}
    return value


def _fill(static, value) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value):
            _fill(s, v)
    elif isinstance(static, Mapping):
        for k in static:
            _fill(static[k], value[k])


def _clone_output(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):  # dict and transformers' ModelOutput (an OrderedDict)
        cloned = {k: _clone_output(v) for k, v in value.items()}
        try:
            return type(value)(**cloned)
        except TypeError:
            return type(value)(cloned)
    if isinstance(value, (list, tuple)):
        items = [_clone_output(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


@contextlib.contextmanager
def attention_masks_skippable_while_capturing():
    """Lets transformers skip an all-visible attention mask while a CUDA graph is captured, as it does eagerly.

    transformers 5.17 decides whether the mask of a batch without padding can be dropped with
    `is_tracing(padding_mask)`, which is true during CUDA graph capture even when there is no padding mask at all.
    It then builds an explicit mask whose last dimension has stride 0; every fused SDPA kernel (flash, cuDNN,
    memory-efficient) refuses it, and attention falls back to the math path with fp32 matrix products, several times
    slower than eagerly (the README has the measurement). Newer transformers only ask
    `is_tracing` about a mask that exists, since without one there is nothing data-dependent to avoid; this applies
    that rule while capturing. A padding mask that is given is still treated as traced (the graph keeps it).
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    original = getattr(masking_utils, "is_tracing", None)
    if original is None or original is _is_tracing_if_given:  # an older transformers, or already patched
        yield
        return
    _ORIGINAL_IS_TRACING.append(original)
    masking_utils.is_tracing = _is_tracing_if_given
    try:
        yield
    finally:
        masking_utils.is_tracing = original
        _ORIGINAL_IS_TRACING.pop()


_ORIGINAL_IS_TRACING: list = []


def _is_tracing_if_given(tensor=None) -> bool:
    # One module-level function (not a new closure per call), so torch.compile's guards on it stay valid.
    return False if tensor is None else _ORIGINAL_IS_TRACING[-1](tensor)


class CudaGraphModel:
    """Calls `model` through CUDA graphs: the first call with a new input signature runs a few eager warm-up
    passes (where lazy autotuning happens) and captures a graph; later calls with the same signature copy the
    inputs into the graph's buffers and replay it.

    Each signature holds its own graph and activation memory. Calls run under `torch.no_grad()`; while the model
    is in training mode they run eagerly.

    Args:
        model: the module to run (on a CUDA device, in eval mode).
        warmup: eager passes before each capture.
        clone_outputs: return copies of the graph's outputs (True), or the graph's own output tensors, which the
            next replay of the same signature overwrites (False: a little faster).
    """

    def __init__(self, model: nn.Module, warmup: int = 2, clone_outputs: bool = True):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the capture needs a warm allocator); got {warmup}.")
        self.model = model
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self._graphs: OrderedDict = OrderedDict()
        self._generation = GENERATION[0]
        installed = model.__dict__.get("forward")  # a runner already routes model(...): graph the model's own forward
        self._forward = installed._forward if isinstance(installed, CudaGraphModel) else model.forward
        try:  # code that inspects model.forward (e.g. the Trainer's column filtering) sees the real signature
            self.__signature__ = inspect.signature(model.forward)
        except (TypeError, ValueError):  # pragma: no cover
            pass

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drops every captured graph (and the memory they hold)."""
        self._graphs.clear()

    def _check_generation(self) -> None:
        if self._generation != GENERATION[0]:  # swapped layers moved or were replaced
            self.reset()
            self._generation = GENERATION[0]

    def __getattr__(self, name):
        if name == "model":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.__dict__["model"], name)

    def __getstate__(self):
        # Graphs are GPU state: a copy (copy.deepcopy, pickling the model) captures its own. The model's own bound
        # forward is rebound on the copy (pickled by name it would resolve to this runner, installed in its place).
        state = dict(self.__dict__, _graphs=OrderedDict())
        if getattr(self._forward, "__func__", None) is getattr(type(self.model), "forward", None):
            state["_forward"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._forward is None:
            self._forward = type(self.model).forward.__get__(self.model)

    def __call__(self, *args, **kwargs):
        if self.model.training or not torch.cuda.is_available():
            return self._forward(*args, **kwargs)
        self._check_generation()
        key = (_signature(list(args)), _signature(kwargs))
        entry = self._graphs.get(key)
        with torch.no_grad():
            if entry is None:
                entry = self._capture(args, kwargs)
                self._graphs[key] = entry
            else:
                _fill(entry.static_args, args)
                _fill(entry.static_kwargs, kwargs)
            entry.graph.replay()
        return _clone_output(entry.output) if self.clone_outputs else entry.output

    def _capture(self, args, kwargs) -> _Captured:
        # A CUDA graph that only the garbage collector still holds, freed while another graph is being captured,
        # makes that capture fail ("operation not permitted when stream is capturing", seen on an H100 after a cast
        # dropped a model's graphs); `torch.cuda.graph` no longer collects by default. Captures are rare: collect.
        gc.collect()
        static_args = _static_copy(list(args))
        static_kwargs = _static_copy(dict(kwargs))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with attention_masks_skippable_while_capturing():  # warm-up included: torch.compile traces there
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self._forward(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                output = self._forward(*static_args, **static_kwargs)
        logger.info(
            "hf-sparse: captured a CUDA graph for %s (%d so far).", type(self.model).__name__, 1 + self.num_graphs
        )
        return _Captured(graph, static_args, static_kwargs, output)


class EagerGraphs(CudaGraphModel):
    """A swapped model's own forward (installed by `swap_to_semi_structured_(eager_graphs=True)`, the default): an
    ordinary `model(**batch)` at inference runs through CUDA graphs, one per input signature, so a plain eager call
    is as fast as a graphed one. Eager PyTorch pays host time per kernel launch, and a BERT-base forward at a few
    thousand tokens is bound by it (the README's benchmark has eager against graphed times); a cuSPARSELt call costs
    more host time than a dense one, so without graphs the swapped model loses there.

    A call runs the plain forward instead whenever a graph would not be safe or not pay: in training mode, with
    gradients enabled, inside `torch.compile` or another capture, with inputs off the GPU or of a type a graph
    cannot be keyed on (a cache object, say), with forward hooks registered (a replay would skip them), for a model
    spread over several devices, or when its capture failed. Outputs are copies (the next replay does
    not overwrite them). At most `max_graphs` signatures keep a graph (least recently used dropped), and after
    `max_captures` captures new signatures run plainly (inputs whose shapes change every call are better padded to
    a few lengths). Graphs are dropped when the model's swapped layers move (`.to()`, `.half()`).

    Each graph keeps the activation memory of its signature allocated between calls. Turn it off with
    `model.forward.enabled = False`, `remove_cuda_graphs(model)`, or `swap_to_semi_structured_(eager_graphs=False)`.
    """

    def __init__(self, model: nn.Module, max_graphs: int = 8, max_captures: int = 64):
        super().__init__(model, warmup=2, clone_outputs=True)
        self.enabled = True
        self.max_graphs = max_graphs
        self.max_captures = max_captures
        self.captures = 0
        self._failed: set = set()
        self._warned_captures = False

    def __getstate__(self):
        state = super().__getstate__()
        state.update(_failed=set(), captures=0, _warned_captures=False, _warned_failure=False, _facts=None)
        return state

    def reset(self) -> None:
        super().reset()
        self._failed.clear()
        self.captures = 0

    def _key(self, args, kwargs) -> tuple | None:
        """The graph key of a call and the device its inputs are on, or None when it must run plainly."""
        if not self.enabled or self.model.training or torch.is_grad_enabled() or not torch.cuda.is_available():
            return None
        if torch.cuda.is_current_stream_capturing():
            return None
        hook_dicts, devices = self._facts_now()
        if not (_plain(args) and _plain(kwargs)) or _hooked(hook_dicts):
            return None
        tensors: list[torch.Tensor] = []
        autocast = torch.is_autocast_enabled()
        # a replay keeps the numerics of its capture: inference mode, autocast and its dtype are part of the key
        modes = (torch.is_inference_mode_enabled(), autocast, torch.get_autocast_dtype("cuda") if autocast else None)
        key = (_signature(list(args), tensors), _signature(kwargs, tensors), modes)
        if not tensors or any(t.device.type != "cuda" or t.requires_grad for t in tensors) or key in self._failed:
            return None
        if not devices <= {tensors[0].device} or len({t.device for t in tensors}) > 1:
            return None  # inputs on several devices, or a model spread over GPUs (device_map)
        return key, tensors[0].device

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # torch.compile traces the model's own forward
            return self._forward(*args, **kwargs)
        self._check_generation()
        found = self._key(args, kwargs)
        if found is None:
            return self._forward(*args, **kwargs)
        key, device = found
        with torch.cuda.device(device):
            return self._graphed(key, args, kwargs)

    def _facts_now(self) -> tuple[list[dict], set]:
        """Every submodule's forward-hook dicts (registering a hook adds to them) and the devices of the model's
        tensors, gathered again only when swapped layers change (walking every module per call would cost more host
        time than checking the hook dicts)."""
        found = self.__dict__.get("_facts")
        if found is None or found[0] != GENERATION[0]:
            hooks = [d for m in self.model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
            devices = {t.device for t in self.model.parameters()} | {t.device for t in self.model.buffers()}
            found = self._facts = (GENERATION[0], hooks, devices)
        return found[1], found[2]

    def _graphed(self, key, args, kwargs):
        entry = self._graphs.get(key)
        if entry is None:
            if self.captures >= self.max_captures:
                if not self._warned_captures:
                    self._warned_captures = True
                    logger.warning(
                        "hf-sparse: %d CUDA graphs captured for %s and input shapes keep changing; new shapes now "
                        "run without graphs (slower). Pad inputs to a few fixed lengths (e.g. padding='max_length').",
                        self.captures, type(self.model).__name__,
                    )  # fmt: skip
                return self._forward(*args, **kwargs)
            self.captures += 1  # failed captures count too: they cost forwards
            try:
                entry = self._capture(args, kwargs)
                if not _plain(entry.output):
                    raise TypeError(f"its output holds a {_first_object(entry.output)}, which replays would share")
            except Exception as err:  # a forward that syncs with the host, or other uncapturable work
                self._failed.add(key)
                log = logger.debug if self.__dict__.get("_warned_failure") else logger.warning
                self._warned_failure = True
                log(
                    "hf-sparse: could not capture %s as a CUDA graph (%s: %s); calls of this shape run without one.",
                    type(self.model).__name__, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                )  # fmt: skip
                return self._forward(*args, **kwargs)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            _fill(entry.static_args, args)
            _fill(entry.static_kwargs, kwargs)
        entry.graph.replay()
        return _clone_output(entry.output)


def _hooked(hook_dicts: list[dict]) -> bool:
    """Whether forward hooks would see a call (a replay runs none of them): in these dicts, or global ones."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(map(len, hook_dicts))


def _first_object(value) -> str:
    if isinstance(value, (list, tuple)):
        return next((_first_object(v) for v in value if not _plain(v)), "")
    if isinstance(value, Mapping):
        return next((_first_object(v) for v in value.values() if not _plain(v)), "")
    return type(value).__name__


def cuda_graphs(model: nn.Module, *, warmup: int = 2, clone_outputs: bool = True, inplace: bool = False):
    """Runs `model` through CUDA graphs, one per input signature (e.g. per (batch size, sequence length)).

    A swapped 2:4 model already graphs its own inference calls (`EagerGraphs`); use this for the dense model you
    compare it with, for any other model bound by host time (small batches), or over `torch.compile(model)`. Inputs
    of a new shape trigger a new capture (a few eager passes): pad batches to a few fixed shapes to keep the number of
    graphs small.

    Args:
        model: the module, on a CUDA device, in eval mode.
        warmup: eager passes before each capture (lazy autotuning of new token counts happens there).
        clone_outputs: return copies of the outputs (safe); False returns the graph's own buffers.
        inplace: also route `model(...)` itself through the graphs (so code that calls the model, e.g. a
            `Trainer`'s evaluate loop, uses them); undo with `remove_cuda_graphs(model)`.

    Returns:
        A `CudaGraphModel` that is called like the model (its other attributes are the model's).

    Example:

    ```python
    >>> fast = hf_sparse.cuda_graphs(model.eval())
    >>> out = fast(input_ids=ids, attention_mask=mask)   # first call per shape captures, later calls replay
    ```
    """
    runner = CudaGraphModel(model, warmup=warmup, clone_outputs=clone_outputs)
    if inplace:
        model.forward = runner  # instance attribute: nn.Module.__call__ now reaches the graphs
    return runner


def remove_cuda_graphs(model: nn.Module) -> None:
    """Undoes `cuda_graphs(model, inplace=True)` (or the automatic graphs of a swapped model, `EagerGraphs`):
    `model(...)` runs its own forward again and the graphs are freed."""
    runner = model.__dict__.pop("forward", None)
    if isinstance(runner, CudaGraphModel):
        runner.reset()
