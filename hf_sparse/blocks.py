"""The model's transformer blocks as calibration sees them: layers grouped by block (or by the input they share),
their inputs recorded by hooks, and blocks run one at a time on stored inputs.

`StackInputs.capture` runs the model once per calibration batch up to the last block of a stack (the blocks of one
`nn.ModuleList` or `nn.Sequential`: a decoder's layers, or an encoder's) and records the arguments each block is
called with: hidden states, attention masks (one per kind of layer where layers differ, as the sliding-window layers
of Gemma or Qwen2 do), rotary position embeddings, position ids, T5's position biases, an encoder's states for
cross-attention. An argument that a block receives from the block before it is recognised by identity with that
block's outputs (its hidden states, T5's position biases) and is not kept: `StackInputs.advance` runs a block on every
batch and hands its outputs to the next block's stored call. The other arguments are computed before the stack runs
and do not depend on its blocks (masks, positions, the states of an encoder that was pruned before its decoder).

The capture checks what this relies on and gives up, saying why, where a stack does not fit: blocks called out of
order or twice, a block that does not take what the block before it returned, one that takes a tensor of the hidden
states' shape that neither the block before it nor the stack's input gave it (a connection that skips blocks), or one
that changes its inputs in place. Calibration then reaches each block by running the model from its inputs again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .selection import block_of

logger = logging.getLogger(__name__)

BLOCK_INPUTS = ("auto", "device", "cpu", "none")
"""Where calibration keeps the inputs of the blocks it runs (see `block_statistics`)."""


class _StopForward(Exception):
    """Raised by a hook once the forward pass has done what calibration needs: the rest of the model is not run."""


class Unsupported(Exception):
    """A stack whose blocks cannot be run on stored inputs; the message says why."""


# -- groups of layers ------------------------------------------------------------------------------------------------


def layer_groups(model: nn.Module, layers: dict[str, nn.Module]) -> list[tuple[str | None, list[str]]]:
    """Layers grouped by block, blocks in module order; layers outside any block come last (one full pass)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    by_block: dict[str | None, list[str]] = {}
    for name in sorted(layers, key=lambda n: order.get(n, len(order))):
        by_block.setdefault(block_of(name), []).append(name)
    blocks = sorted((b for b in by_block if b is not None), key=lambda b: order.get(b, len(order)))
    groups = [(b, by_block[b]) for b in blocks]
    if None in by_block:
        groups.append((None, by_block[None]))
    return groups


@torch.no_grad()
def input_groups(model: nn.Module, layers: dict[str, nn.Module], batch: dict) -> list[tuple[str | None, list[str]]]:
    """`layer_groups` with each block split into groups of layers that take the same input tensor, in the order one
    forward pass of `batch` reaches them. Layers the pass does not reach stay in one group at their block's end."""
    calls = group_inputs(model, layers, "the model", None, batch, stop_after_group=False)
    # the same tensor (as storage, shape and strides: the record is a detached view); all are alive here
    first_input = {name: (x[0].data_ptr(), x[0].shape, x[0].stride()) for name, x in calls.items()}
    reached = list(calls)  # in the order the pass first reached them
    groups = []
    for block, names in layer_groups(model, layers):
        in_block = [name for name in reached if name in names]
        split: list[list[str]] = []
        for name in in_block:
            if split and first_input[name] == first_input[split[-1][0]]:
                split[-1].append(name)
            else:
                split.append([name])
        missed = [name for name in names if name not in first_input]
        groups.extend((block, group) for group in split + ([missed] if missed else []))
    return groups


# -- recording a pass ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_inputs(targets: dict[str, nn.Module], stop_after_group: bool) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Yields a dict that fills, while the context is open, with the inputs of the layers `targets` (one per call, in
    the order they run). With `stop_after_group`, the pass is stopped (`_StopForward`) once every layer has run."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []

    def stop_once_all_ran(module, args, output):
        if len(seen) == len(targets):
            raise _StopForward

    for name, module in targets.items():

        def record(module, args, kwargs, _name=name):
            seen.setdefault(_name, []).append((args[0] if args else kwargs.get("input")).detach())

        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
        if stop_after_group:
            handles.append(module.register_forward_hook(stop_once_all_ran))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _forward_failed(block: str, layer: str, batch: dict, err: Exception) -> ValueError:
    return ValueError(
        f"calibrating {block} ({layer}, ...): the model's forward failed on a calibration batch with "
        f"keys {sorted(batch)} ({type(err).__name__}: {err}). The batches must reach every selected layer (an "
        "encoder-decoder needs decoder inputs too: decoder_input_ids, or labels that the model shifts into them); "
        "nothing was pruned."
    )


def group_inputs(
    model: nn.Module,
    targets: dict[str, nn.Module],
    block_name: str | None,
    block: nn.Module | None,
    batch: dict,
    stop_after_group: bool,
) -> dict[str, list[torch.Tensor]]:
    """The inputs of the layers `targets` on `batch` (one per call), from a forward pass of the whole `model` that
    stops at the end of `block`, or with `stop_after_group` once every layer of `targets` has run."""

    def stop(module, args, output):
        raise _StopForward

    handle = block.register_forward_hook(stop) if block is not None and not stop_after_group else None
    try:
        with recorded_inputs(targets, stop_after_group) as seen:
            model(**batch)
    except _StopForward:
        pass
    except (ValueError, TypeError) as err:
        raise _forward_failed(block_name or "the layers outside the blocks", next(iter(targets)), batch, err) from err
    finally:
        if handle is not None:
            handle.remove()
    return seen


# -- blocks on stored inputs -----------------------------------------------------------------------------------------


@dataclass
class _Call:
    """The arguments a block was called with. Keys are positions (int) or keyword names (str)."""

    args: list
    kwargs: dict

    def items(self) -> list:
        return [*enumerate(self.args), *self.kwargs.items()]

    def get(self, key):
        return self.args[key] if isinstance(key, int) else self.kwargs[key]

    def set(self, key, value) -> None:
        if isinstance(key, int):
            self.args[key] = value
        else:
            self.kwargs[key] = value


@dataclass
class _Offloaded:
    """A tensor kept on the CPU, and the device it goes back to when its block runs."""

    tensor: torch.Tensor
    device: torch.device


def _outputs(output) -> tuple:
    """A block's outputs as a tuple: a tensor (Llama, BERT in transformers 5), a tuple (T5), or a `ModelOutput`."""
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, Mapping):
        return tuple(output.values())
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, _Call):
        yield from _tensors([value.args, value.kwargs])
    elif isinstance(value, (torch.Tensor, _Offloaded)):
        yield value.tensor if isinstance(value, _Offloaded) else value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _map(value, fn):
    """`value` with every tensor (or `_Offloaded`) replaced by `fn(it)`, through lists, tuples and dicts."""
    if isinstance(value, (torch.Tensor, _Offloaded)):
        return fn(value)
    if isinstance(value, _Call):
        return _Call(_map(value.args, fn), _map(value.kwargs, fn))
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map(item, fn) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: _map(item, fn) for key, item in value.items()}
    return value


def _offload(value, memo: dict):
    """`value` with its device tensors copied to the CPU once each (`memo`: by identity, so an attention mask that
    every block of the batch shares is copied once)."""

    def to_cpu(tensor):
        if isinstance(tensor, _Offloaded) or tensor.device.type == "cpu":
            return tensor
        if id(tensor) not in memo:
            memo[id(tensor)] = (tensor, _Offloaded(tensor.to("cpu"), tensor.device))  # the tensor keeps its id taken
        return memo[id(tensor)][1]

    return _map(value, to_cpu)


def _onto_device(value):
    return _map(value, lambda t: t.tensor.to(t.device, non_blocking=True) if isinstance(t, _Offloaded) else t)


def stored_bytes(values) -> int:
    """Bytes of the distinct tensor storages in `values` (shared tensors and views counted once)."""
    storages = {}
    for tensor in _tensors(values):
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class StackInputs:
    """The calls of blocks `first..last` of one stack on every calibration batch, filled block after block.

    The inputs of block `ready` are complete for every batch; `prepare(i)` runs the blocks before `i` on their
    stored inputs (`advance`) until block `i`'s are. A block's call is dropped once its outputs are handed on, so at
    any time about one block's inputs per batch are held (plus what the batches' calls share: masks, positions).
    """

    def __init__(self, name: str, blocks: dict[int, nn.Module], batches: int):
        self.name = name
        self.blocks = blocks
        self.first = self.ready = min(blocks)
        self.calls: dict[int, list[_Call | None]] = {index: [None] * batches for index in blocks}
        self.links: dict[int, list[tuple[int | str, int]]] = {}
        self.offload = False

    @classmethod
    def capture(
        cls, model: nn.Module, name: str, indices: range, batches: list, layer: str, where: str = "auto"
    ) -> StackInputs:
        """Runs `model` on every batch (`CalibrationBatch`es) up to block `indices[-1]` of the stack `name` and
        records the calls of blocks `indices`; `layer` (the first layer to calibrate) names the place in errors.
        Raises `Unsupported` where the stack does not fit. `where`: "device" keeps the calls where the model computed
        them, "cpu" offloads them, "auto" offloads when they would take more than half of the device's free memory.
        """
        container = model.get_submodule(name)
        blocks = {}
        for index in indices:
            block = container[index] if isinstance(container, (nn.ModuleList, nn.Sequential)) else None
            if not isinstance(block, nn.Module):
                raise Unsupported(f"{name} is a {type(container).__name__}, not an nn.ModuleList of blocks")
            blocks[index] = block
        stack = cls(name, blocks, len(batches))
        for position, batch in enumerate(batches):
            calls, links = _capture(model, name, blocks, batch.inputs, layer)
            if position == 0:
                stack.links = links
                stack.offload = where == "cpu" or (where == "auto" and _too_large(calls, batches))
            elif links != stack.links:
                raise Unsupported(f"its blocks pass each other other outputs on batch {position} than on batch 0")
            memo = {}
            for index, call in calls.items():
                stack.calls[index][position] = _offload(call, memo) if stack.offload else call
        return stack

    def call(self, index: int, batch: int):
        """Block `index` run on batch `batch`'s stored inputs; returns what the block returns."""
        call = self.calls[index][batch]
        return self.blocks[index](*_onto_device(call.args), **_onto_device(call.kwargs))

    def record(self, index: int, batch: int, targets: dict[str, nn.Module], stop_after_group: bool) -> dict:
        """The inputs of the layers `targets` (of block `index`) when the block runs on batch `batch`, as
        `recorded_inputs` gives them."""
        try:
            with recorded_inputs(targets, stop_after_group) as seen:
                self.call(index, batch)
        except _StopForward:
            pass
        return seen

    def advance(self) -> None:
        """Runs block `ready` on every batch and hands its outputs to the next block's calls."""
        index = self.ready
        for batch in range(len(self.calls[index])):
            outputs = _outputs(self.call(index, batch))
            following = self.calls[index + 1][batch]
            for key, output in self.links[index + 1]:
                following.set(key, _offload(outputs[output], {}) if self.offload else outputs[output])
            self.calls[index][batch] = None
        self.ready += 1

    def prepare(self, index: int) -> None:
        while self.ready < index:
            self.advance()

    def nbytes(self) -> int:
        return stored_bytes([call for calls in self.calls.values() for call in calls if call is not None])


def _too_large(calls: dict[int, _Call], batches: list) -> bool:
    """Whether all batches' calls, estimated from the first's by their numbers of tokens, would take more than half of
    the free memory of the device they are on (the other half is for a block's forward, its statistics, the solve)."""
    device = next((t.device for t in _tensors(list(calls.values())) if t.device.type == "cuda"), None)
    if device is None:
        return False
    tokens = [int(b.token_masks[0].numel()) if b.token_masks else 1 for b in batches]
    estimate = stored_bytes(list(calls.values())) * sum(tokens) / tokens[0]
    free = (
        torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    )
    return estimate > free / 2


def _capture(model: nn.Module, name: str, blocks: dict[int, nn.Module], inputs: dict, layer: str) -> tuple:
    """The calls of `blocks` on one batch, with the arguments each takes from the block before it left out (None),
    and where those go: `{index: [(key, output number), ...]}`."""
    first, last = min(blocks), max(blocks)
    calls: dict[int, _Call] = {}
    links: dict[int, list] = {}
    state = {"next": first, "outputs": None, "versions": []}

    def before(module, args, kwargs, index):
        where = f"{name}.{index}"
        if index != state["next"]:
            raise Unsupported(f"{where} ran when {name}.{state['next']} was expected (blocks out of order or reused)")
        call = _without_caches(_Call(list(args), dict(kwargs)))
        state["versions"] = [(t, _version(t)) for _, t in call.items() if isinstance(t, torch.Tensor)]
        if index > first:
            links[index] = _link(call, state["outputs"], calls[first], where)
        calls[index] = call
        if index == last:
            raise _StopForward
        state["next"], state["outputs"] = index + 1, None

    def after(module, args, kwargs, output, index):
        if any(_version(t) != version for t, version in state["versions"]):
            raise Unsupported(f"{name}.{index} changes its inputs in place")
        state["outputs"], state["versions"] = _outputs(output), []

    handles = []
    for index, block in blocks.items():
        handles.append(block.register_forward_pre_hook(_bind(before, index), with_kwargs=True, prepend=True))
        handles.append(block.register_forward_hook(_bind(after, index), with_kwargs=True, prepend=True))
    try:
        model(**inputs)
    except _StopForward:
        return calls, links
    except (ValueError, TypeError) as err:
        raise _forward_failed(f"{name}.{first}", layer, inputs, err) from err
    finally:
        for handle in handles:
            handle.remove()
    raise Unsupported(f"the forward pass did not reach {name}.{state['next']}")


def _without_caches(call: _Call) -> _Call:
    """`call` with a key/value cache (a T5 decoder makes one whatever `use_cache` says) replaced by None: stored, it
    would grow with every pass and hand its cross-attention keys to later passes instead of computing them. A fresh
    cache, as each forward pass of the whole model makes, computes what no cache does."""
    from transformers.cache_utils import Cache

    for key, value in call.items():
        if isinstance(value, Cache):
            call.set(key, None)
    return call


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's count of in-place changes (none is kept for tensors made under `torch.inference_mode`)."""
    return None if tensor.is_inference() else tensor._version


def _bind(hook, index: int):
    return lambda *args: hook(*args, index=index)


def _link(call: _Call, previous: tuple, first: _Call, where: str) -> list[tuple[int | str, int]]:
    """Which arguments of `call` are outputs of the block before it (`previous`), by identity; those are left out
    of `call`. Raises `Unsupported` if there is none, or if another argument has the hidden states' shape but came
    from neither that block nor the stack's input (the arguments of its `first` block)."""
    links = []
    for key, value in call.items():
        output = next((i for i, out in enumerate(previous or ()) if out is value and out is not None), None)
        if output is not None and isinstance(value, torch.Tensor):
            links.append((key, output))
    if not any(output == 0 for _, output in links):
        raise Unsupported(f"{where} does not take the hidden states that the block before it returned")
    hidden = {tuple(call.get(key).shape) for key, output in links if output == 0}
    given = {id(value) for _, value in first.items()}
    linked = {key for key, _ in links}
    for key, value in call.items():
        if key not in linked and isinstance(value, torch.Tensor) and tuple(value.shape) in hidden:
            if id(value) not in given:
                raise Unsupported(
                    f"{where} takes {key!r}, a tensor of the hidden states' shape that the block before it did not "
                    "return (a connection that skips blocks?)"
                )
    for key in linked:
        call.set(key, None)
    return links
