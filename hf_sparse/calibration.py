"""Calibration for the activation-aware criteria: the batches to calibrate on, and the block-by-block pass that
gathers each layer's input statistics.

`block_statistics` calibrates the model one transformer block at a time. The statistics of block k are gathered
after the caller has pruned blocks 0..k-1 (and, for SparseGPT, updated them), so every block sees the inputs it will
see in the pruned model. Only that block's statistics are held: one vector (Wanda) or one `in_features x in_features`
matrix (SparseGPT) per layer. The blocks run on stored inputs (`hf_sparse.blocks.StackInputs`): the model runs once
per calibration batch up to the last block, recording each block's inputs; then each block runs on them for its
statistics and, once pruned, again for its outputs, the next block's inputs. That is about three block passes per
block and batch whatever the depth (the last block needs one), where reaching block k by running blocks 0..k-1 again
took k(k+1)/2 for k blocks; it costs the memory of every batch's hidden states (`block_statistics` gives the
formula), on the GPU or offloaded to the CPU. A model whose blocks cannot be run on stored inputs (the log says
why), or any with `block_inputs="none"`, reaches each block by running the model from its inputs again instead.

With `sequential`, a block is calibrated group by group instead: layers that take the same input tensor form a
group (query/key/value; the attention output; the feed-forward input; the feed-forward output), in the order the
forward pass reaches them, and each group's statistics are gathered after the earlier groups of its block are
pruned. The forward pass then stops after the group's last layer.

An encoder-decoder's decoder is calibrated on what training feeds it: the decoder inputs of the batch, or those the
model shifts from its `labels` (`prepare_batch`); its padding, like the encoder's, is left out of the statistics.

Statistics run in float32 on the CUDA GPU when there is one (or on `device`), whatever device the model is on; the
forward passes run where the model is.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks import BLOCK_INPUTS, StackInputs, Unsupported, group_inputs, input_groups, layer_groups
from .config import SparsityConfig

logger = logging.getLogger(__name__)

_LABEL_KEYS = {"labels", "label", "label_ids", "start_positions", "end_positions"}
"""Batch keys that are labels, not model inputs (calibration needs activations only)."""
_DECODER_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")


# -- calibration data ------------------------------------------------------------------------------------------------


def _is_batch(item) -> bool:
    """A dict whose `input_ids` (or first tensor) has a batch dimension, rather than one example."""
    if not isinstance(item, Mapping):
        return False
    value = item.get("input_ids", next(iter(item.values()), None))
    return isinstance(value, torch.Tensor) and value.dim() >= 2


def _is_columns(item) -> bool:
    """A dict of columns of lists, one sequence per example (a tokenizer's output without `return_tensors`)."""
    value = item.get("input_ids", next(iter(item.values()), None))
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (list, tuple, torch.Tensor))


def _rows(columns: Mapping) -> list[dict]:
    """The examples of a dict of columns."""
    rows = len(columns.get("input_ids", next(iter(columns.values()))))
    uneven = {key: len(value) for key, value in columns.items() if len(value) != rows}
    if uneven:
        raise ValueError(
            f"calibration data: columns {uneven} do not have one entry per sequence ({rows}); give columns of equal "
            "length, or tensors with a batch dimension."
        )
    return [{key: column[i] for key, column in columns.items()} for i in range(rows)]


def _collate(examples: list[Mapping], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stacks examples into a batch, right-padding 1-D sequences of different lengths (labels with -100)."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if isinstance(values[0], str) or (isinstance(values[0], list) and values[0] and isinstance(values[0][0], str)):
            continue  # text columns (e.g. "context") are not model inputs
        tensors = [torch.as_tensor(v) for v in values]
        if all(t.shape == tensors[0].shape for t in tensors):
            batch[key] = torch.stack(tensors)
            continue
        if any(t.dim() != 1 for t in tensors):
            raise ValueError(
                f"calibration examples have {key!r} of different shapes {sorted({tuple(t.shape) for t in tensors})}; "
                "pass batches (dicts of tensors with a batch dimension) or a DataLoader with a padding collator."
            )
        pad = -100 if "label" in key else pad_token_id if key == "input_ids" else 0
        batch[key] = nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad)
        if key == "input_ids" and "attention_mask" not in examples[0]:
            lengths = torch.tensor([len(t) for t in tensors])
            batch["attention_mask"] = (torch.arange(batch[key].shape[1])[None] < lengths[:, None]).long()
    return batch


def _take_rows(batch: dict, rows: int) -> dict:
    size = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if size is None or size <= rows:
        return batch
    return {
        k: v[:rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
        for k, v in batch.items()
    }


def _batch_size(batch: dict) -> int:
    return next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 1)


def calibration_batches(data, config: SparsityConfig, pad_token_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """The first `config.calibration_samples` sequences of `data`, as a list of batches (dicts of tensors).

    Args:
        data: a `torch.utils.data.DataLoader` or any iterable of batches (dicts of tensors with a batch dimension);
            a single batch; or a dataset / list / iterable of examples (dicts of tensors or lists of ints, as a
            tokenized `datasets.Dataset` returns them), which are padded and batched by
            `config.calibration_batch_size`. Text columns are ignored; tokenize first.
        config: gives `calibration_samples` and `calibration_batch_size`.
        pad_token_id: padding of `input_ids` when examples of different lengths are batched here.

    Example:

    ```python
    >>> batches = calibration_batches(tokenizer(texts, padding=True, return_tensors="pt"), SparsityConfig())
    ```
    """
    if data is None:
        raise ValueError(
            f"criterion={config.criterion!r} needs calibration data: pass calibration_data= to hf_sparse.prune_ "
            "(a DataLoader, a tokenized dataset, or a list of batches or examples), or SparsityCallback("
            "calibration_data=...); under a Trainer the callback takes it from the train dataloader."
        )
    if isinstance(data, Mapping):  # one batch, e.g. a tokenizer's BatchEncoding, of tensors or of lists
        if _is_columns(data):
            data = _rows(data)
        else:
            data = [dict(data)] if _is_batch(data) else [data]
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise TypeError(
            f"calibration_data must be a DataLoader, a dataset, or a list of batches or examples; got "
            f"{type(data).__name__}. Tokenize text first (e.g. tokenizer(texts, padding=True, return_tensors='pt'))."
        )
    wanted = config.calibration_samples
    batches, pending, seen = [], [], 0

    def flush():
        nonlocal pending, seen
        if pending:
            batch = _collate(pending, pad_token_id)
            batches.append(batch)
            seen += _batch_size(batch)
            pending = []

    items = iter(data) if isinstance(data, Iterable) else (data[i] for i in range(len(data)))
    for item in items:
        if seen >= wanted:
            break
        if _is_batch(item):
            flush()
            batch = _take_rows(dict(item), wanted - seen)
            batches.append(batch)
            seen += _batch_size(batch)
        elif isinstance(item, Mapping):
            pending.append(item)
            if len(pending) == min(config.calibration_batch_size, wanted - seen):
                flush()
        else:
            raise TypeError(
                f"calibration_data items must be dicts (batches or examples, e.g. with 'input_ids'); got "
                f"{type(item).__name__}."
            )
    flush()
    if not batches:
        raise ValueError("calibration_data is empty; give at least one batch or example.")
    return batches


def calibration_sample(dataset, config: SparsityConfig, seed: int = 0) -> list:
    """`config.calibration_samples` examples of a map-style `dataset` (all of it if smaller), drawn by a permutation
    seeded with `seed`: every data-parallel rank draws the same examples, and no global random state is touched.

    Example:

    ```python
    >>> examples = calibration_sample(train_features, SparsityConfig(criterion="sparsegpt"), seed=0)
    >>> masks = hf_sparse.prune_(model, config, calibration_data=examples)
    ```
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[: config.calibration_samples].tolist()
    return [dataset[i] for i in order]


def calibration_from_dataloader(dataloader, config: SparsityConfig, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from a training dataloader, without disturbing it.

    For a map-style dataset, `calibration_sample` draws the examples and the dataloader's own collator batches them
    by `config.calibration_batch_size`. Otherwise the dataloader's first batches are used.
    """
    dataset = getattr(dataloader, "dataset", None)
    collate_fn = getattr(dataloader, "collate_fn", None)
    map_style = (
        dataset is not None
        and collate_fn is not None
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
        and not isinstance(dataset, torch.utils.data.IterableDataset)
    )
    if not map_style:
        return calibration_batches(dataloader, config)
    examples = calibration_sample(dataset, config, seed)
    size = config.calibration_batch_size
    return [dict(collate_fn(examples[j : j + size])) for j in range(0, len(examples), size)]


@dataclass
class CalibrationBatch:
    """One calibration batch as the model's forward takes it, and which of its tokens are real.

    `token_masks` holds one boolean `(batch, length)` mask per stream of tokens: the encoder's (or the only one's),
    from `attention_mask`, and an encoder-decoder's decoder's. A layer's inputs are matched to the mask with as many
    tokens, and the statistics leave out the padding it marks.
    """

    inputs: dict[str, Any]
    token_masks: list[torch.Tensor] = field(default_factory=list)


def prepare_batch(model: nn.Module, batch: Mapping, device: torch.device, index: int = 0) -> CalibrationBatch:
    """The entries of `batch` that `model.forward` takes, labels left out, tensors moved to `device`, and the masks
    of the real tokens.

    An encoder-decoder is fed the decoder inputs training feeds it: a batch with `labels` but no decoder inputs gets
    `decoder_input_ids` shifted from the labels by the model itself (`prepare_decoder_input_ids_from_labels`, as
    transformers' `DataCollatorForSeq2Seq` does), or keeps `labels` for a model without that method (its forward
    shifts them, as in training). The decoder's real tokens are those of `decoder_attention_mask`, else those whose
    label is not -100. A float input with a NaN or inf is refused, naming the batch (`index`) and the key.
    """
    names, takes_any = _forward_inputs(model)
    inputs, unnamed = {}, []
    for key, value in batch.items():
        if key in _LABEL_KEYS:
            continue  # calibration needs activations only; labels would just add a loss computation
        if key not in names:
            unnamed.append(key)
            if not takes_any:
                continue
        inputs[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    if unnamed and index == 0:  # a misspelt "attention_mask" would silently calibrate on the padding too
        logger.warning(
            "hf-sparse: calibration batch keys %s are not named inputs of %s.forward: %s. Check their names.",
            unnamed, type(model).__name__,
            "they are passed on through its **kwargs, where the model may ignore them" if takes_any else "left out",
        )  # fmt: skip
    if not inputs:
        raise ValueError(f"calibration batch keys {sorted(batch)} are not inputs of {type(model).__name__}.forward.")
    _check_finite_inputs(inputs, index)
    masks = [_token_mask(batch.get("attention_mask"), inputs.get("input_ids"))]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        masks.append(_decoder_inputs_(model, batch, inputs, masks[0], device))
    return CalibrationBatch(inputs, [mask for mask in masks if mask is not None])


def _forward_inputs(model: nn.Module) -> tuple[set[str], bool]:
    """The named inputs of `model.forward` (with a PEFT model's, its base model's too, which it passes on), and
    whether it takes any keyword."""
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    base = getattr(model, "get_base_model", None)
    if callable(base):
        params = {**params, **inspect.signature(base().forward).parameters}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, p in params.items() if p.kind in named}, takes_any


def _check_finite_inputs(inputs: dict, index: int) -> None:
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"calibration batch {index}: {key!r} holds {count} NaN or inf value(s); calibration needs finite "
                "data. Clean or drop those examples (nothing was pruned)."
            )


def _token_mask(mask, ids) -> torch.Tensor | None:
    """A boolean `(batch, length)` mask of the real tokens: `mask` if it is one, else every token of `ids`."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()
    return torch.ones(ids.shape[:2], dtype=torch.bool) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def _decoder_inputs_(model: nn.Module, batch: Mapping, inputs: dict, encoder_mask, device) -> torch.Tensor | None:
    """Adds an encoder-decoder's decoder inputs to `inputs` where `batch` has only labels for them, and returns the
    decoder's token mask."""
    labels = batch.get("labels")
    has_labels = isinstance(labels, torch.Tensor) and labels.dim() == 2
    if has_labels and not any(key in batch for key in _DECODER_INPUT_KEYS):
        shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if shift is not None:
            inputs["decoder_input_ids"] = shift(labels=labels.to(device))
        else:
            inputs["labels"] = labels.to(device)
    mask = batch.get("decoder_attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        mask = mask.bool()
    elif has_labels:
        mask = labels != -100
    else:
        mask = _token_mask(None, inputs.get("decoder_input_ids"))
    if mask is not None and encoder_mask is not None and mask.shape == encoder_mask.shape:
        if not torch.equal(mask.cpu(), encoder_mask.cpu()):
            mask = _one_more_decoder_position_(inputs, mask, getattr(model.config, "pad_token_id", None) or 0)
    return mask


def _one_more_decoder_position_(inputs: dict, mask: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Appends one padding position to the decoder's inputs when the decoder has as many tokens as the encoder but
    other padding, so that a layer's inputs tell which stream they are by their number of tokens. A causal decoder's
    earlier positions never attend to a later one, so nothing they compute changes; the new position is left out."""
    fill = {"decoder_input_ids": pad_token_id, "decoder_attention_mask": 0, "labels": -100}
    for key, value in fill.items():
        if isinstance(inputs.get(key), torch.Tensor):
            inputs[key] = torch.cat([inputs[key], inputs[key].new_full((inputs[key].shape[0], 1), value)], dim=1)
    if isinstance(inputs.get("decoder_inputs_embeds"), torch.Tensor):
        embeds = inputs["decoder_inputs_embeds"]
        inputs["decoder_inputs_embeds"] = torch.cat([embeds, embeds.new_zeros(embeds[:, :1].shape)], dim=1)
    return torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)


def calibration_samples(batches: list[CalibrationBatch]) -> int:
    """The number of sequences in `batches`."""
    return sum(_batch_size(batch.inputs) for batch in batches)


# -- statistics ------------------------------------------------------------------------------------------------------


class _InputStats:
    """Running statistics of a linear layer's inputs over the calibration tokens (padding excluded).

    Wanda needs `sq_norms`, the sum of squared inputs per feature. SparseGPT needs `hessian`, the sum of `x x^T`;
    with `constant_input`, over the inputs with a 1 appended (the bias is the weight of that input).
    """

    def __init__(self, in_features: int, hessian: bool, device: torch.device, constant_input: bool = False):
        self.tokens = 0
        self.unmatched = False
        self.constant_input = constant_input and hessian
        size = in_features + self.constant_input
        self.sq_norms = None if hessian else torch.zeros(in_features, device=device, dtype=torch.float32)
        self.hessian = torch.zeros(size, size, device=device, dtype=torch.float32) if hessian else None
        self.device = device

    def _tokens(self, x: torch.Tensor, token_masks: list[torch.Tensor]) -> torch.Tensor:
        x = x.detach().reshape(-1, x.shape[-1])
        # the stream (encoder or decoder) whose number of tokens the inputs have
        token_mask = next((mask for mask in token_masks if mask.numel() == x.shape[0]), None)
        if token_mask is not None:
            x = x[token_mask.reshape(-1).to(x.device)]
        elif any(not bool(mask.all()) for mask in token_masks):
            self.unmatched = True  # the batch has padding, but these inputs cannot be told where it is
        x = x.to(self.device, torch.float32)
        if self.constant_input:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        return x

    def add(self, x: torch.Tensor, token_masks: list[torch.Tensor]) -> None:
        x = self._tokens(x, token_masks)
        self.tokens += x.shape[0]
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)
        else:
            self.sq_norms += (x * x).sum(dim=0)

    def finite(self) -> bool:
        """Whether the statistics are finite: a NaN or inf input (at a real token), or inputs whose squares overflow
        float32, make the sums of squares (Wanda's norms, the Hessian's diagonal) non-finite."""
        squares = self.sq_norms if self.hessian is None else torch.diagonal(self.hessian)
        return bool(torch.isfinite(squares).all())


def _non_finite_message(name: str, index: int, stat: _InputStats, calls: list, masks: list) -> str:
    """Why the statistics of layer `name` stopped being finite on calibration batch `index`."""
    inputs = [stat._tokens(x, masks) for x in calls]
    where = f"the calibration inputs of {name} on calibration batch {index}"
    if all(bool(torch.isfinite(x).all()) for x in inputs):
        largest = max(float(x.abs().max()) for x in inputs if x.numel())
        return (
            f"{where} are so large (up to {largest:.3g}) that their squares overflow float32: scale the data, or "
            "check the model's weights and normalisation layers before this layer. Nothing was pruned."
        )
    return (
        f"{where} hold NaN or inf values, the first layer (in forward order) whose inputs do; the calibration data is "
        f"finite, so the model produced them ({calls[0].dtype} activations): non-finite weights before this layer, or "
        "an overflow of its dtype (run calibration in float32). Nothing was pruned."
    )


def stats_device(model: nn.Module, device=None) -> torch.device:
    """Where statistics and solves run: `device`, else the model's accelerator, else CUDA if any, else the CPU."""
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return param.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def block_statistics(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: list[CalibrationBatch],
    hessian: bool,
    device: torch.device,
    sequential: bool = False,
    constant_input: bool = False,
    block_inputs: str = "auto",
) -> Iterator[dict[str, _InputStats]]:
    """Yields, group after group (block after block, or with `sequential` the groups of layers that share an
    input), the input statistics of `layers` in that group over `batches`.

    The next group's statistics are gathered only when the caller asks for them, so whatever the caller does to
    the group it was given (prune it) is seen by every later group. `constant_input` appends a constant 1 to the
    inputs of layers with a bias (SparseGPT then updates the bias). The model's train/eval mode and
    `config.use_cache` are restored when the iteration ends or fails.

    Blocks run on stored inputs (`hf_sparse.blocks.StackInputs`) unless `block_inputs="none"` or a stack does not
    allow it. Peak memory, for B calibration sequences of T tokens, hidden size h and activations of s bytes:

        B·T·h·s                      the inputs of the block being calibrated, every batch's (its hidden states)
      + what the batches' calls hold beside them: attention masks (an eager 4-D mask is b·T²·s for a batch of b
        sequences, SDPA without padding needs none), rotary cos and sin (2·T·d·s per batch for head size d where, as
        in Llama, a batch's sequences share their positions; up to 2·B·T·d·s), an encoder's states for its decoder
      + one block's statistics: 4 bytes x the sum over its layers of in_features (Wanda) or in_features^2
        (SparseGPT; (in_features + 1)^2 with the bias update), on the statistics device
      + one block's forward on one batch, and that batch's outputs (b·T·h·s) as they replace its inputs.

    With `block_inputs="cpu"` (or "auto" where the first term would take more than half of the device's free memory)
    the first two terms are held on the CPU, and one batch's at a time on the device. With "none" nothing is stored:
    each block is reached by running the model from its inputs again (k(k+1)/2 block passes for k blocks, against
    about 3 per block on stored inputs), and the first two terms are one batch's.

    Args:
        block_inputs: "auto", "device" (keep them where the model computes them), "cpu" or "none".
    """
    if block_inputs not in BLOCK_INPUTS:
        raise ValueError(f"block_inputs must be one of {BLOCK_INPUTS}; got {block_inputs!r}.")
    modules = dict(model.named_modules())
    was_training = model.training
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    model.eval()
    if use_cache:
        model_config.use_cache = False  # a KV cache would grow with every block pass
    try:
        groups = input_groups(model, layers, batches[0].inputs) if sequential else layer_groups(model, layers)
        stack, stack_name = None, None
        for position, (block, names) in enumerate(groups):
            if block is None or _stack_name(block) != stack_name:
                stack = None  # frees the stored inputs of the stack before
                stack = _stack_inputs(model, groups, position, batches, block_inputs)
                stack_name = block and _stack_name(block)
            targets = {name: layers[name] for name in names}
            stats = {
                name: _InputStats(layer.in_features, hessian, device, constant_input and layer.bias is not None)
                for name, layer in targets.items()
            }
            if stack is not None:
                stack.prepare(_block_index(block))
            for index, batch in enumerate(batches):
                if stack is not None:
                    seen = stack.record(_block_index(block), index, targets, stop_after_group=sequential)
                else:
                    seen = group_inputs(model, targets, block, modules.get(block), batch.inputs, sequential)
                _add(stats, seen, index, batch)
            _check_reached(stats)
            yield stats
            del stats
    finally:
        model.train(was_training)
        if use_cache:
            model_config.use_cache = use_cache


def _stack_name(block: str) -> str:
    return block.rpartition(".")[0]


def _block_index(block: str) -> int:
    return int(block.rpartition(".")[2])


def _stack_inputs(model: nn.Module, groups: list, position: int, batches: list, where: str) -> StackInputs | None:
    """The stored inputs of the stack of `groups[position]`'s block, for its blocks from there on; None for layers
    outside the blocks, with `where="none"`, or (with a log line saying why) where the stack does not allow it."""
    block, names = groups[position]
    if block is None or where == "none":
        return None
    name = _stack_name(block)
    indices = []
    for other, _ in groups[position:]:
        if other is None or _stack_name(other) != name:
            break
        indices.append(_block_index(other))
    try:
        stack = StackInputs.capture(model, name, range(indices[0], indices[-1] + 1), batches, names[0], where)
    except Unsupported as reason:
        logger.warning(
            "hf-sparse: %s: calibration cannot run its blocks on stored inputs (%s), so it runs the model from its "
            "inputs again for each block (k(k+1)/2 block passes for k blocks).",
            name, reason,
        )  # fmt: skip
        return None
    logger.info(
        "hf-sparse: %s: calibration runs blocks %d-%d on stored inputs (%.1f MiB%s).",
        name, indices[0], indices[-1], stack.nbytes() / 2**20, " offloaded to the CPU" if stack.offload else "",
    )  # fmt: skip
    return stack


def _add(stats: dict[str, _InputStats], seen: dict[str, list], index: int, batch: CalibrationBatch) -> None:
    """Adds one batch's recorded inputs to the statistics; names the first layer (in forward order) whose
    statistics stop being finite."""
    for name, calls in seen.items():
        for x in calls:
            stats[name].add(x, batch.token_masks)
        if not stats[name].finite():
            raise ValueError(_non_finite_message(name, index, stats[name], calls, batch.token_masks))


def _check_reached(stats: dict[str, _InputStats]) -> None:
    _warn_unmatched([name for name, stat in stats.items() if stat.unmatched])
    for name, stat in stats.items():
        if stat.tokens == 0:
            raise ValueError(
                f"{name} saw no calibration tokens: the calibration batches do not reach it (an "
                "encoder-decoder needs decoder inputs too), or exclude it with exclude_modules."
            )


def _warn_unmatched(names: list[str]) -> None:
    if names:
        logger.warning(
            "hf-sparse: the calibration inputs of %s have as many tokens as none of the batch's attention masks (does "
            "the model add or drop positions?): their statistics count every position, padding included.",
            names,
        )
