"""Which modules of a model get N:M masks, and why the others do not."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import SparsityConfig

logger = logging.getLogger(__name__)


@dataclass
class Selection:
    """The result of `select_layers`: the layers to prune, and the matched modules skipped with a reason."""

    targets: dict[str, nn.Linear]
    skipped: dict[str, str]

    def format_skipped(self) -> str:
        if not self.skipped:
            return ""
        width = max(len(name) for name in self.skipped)
        rows = [f"  {name:<{width}}  {reason}" for name, reason in self.skipped.items()]
        return f"{len(self.skipped)} module(s) not pruned:\n" + "\n".join(rows)


def _matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if re.fullmatch(pattern, name) or name == pattern or name.endswith("." + pattern):
            return True
    return False


def block_of(name: str) -> str | None:
    """The repeated (transformer) block a module belongs to, or None: its name up to the first numeric component.

    Transformer blocks live in an `nn.ModuleList`, so their modules have a numeric path component
    ("bert.encoder.layer.3.output.dense" -> "bert.encoder.layer.3", "model.layers.0.mlp.up_proj" ->
    "model.layers.0"); embeddings, poolers and task heads ("qa_outputs", "classifier", "lm_head") do not.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def is_router(name: str) -> bool:
    """Whether module `name` is (or is inside) a mixture-of-experts router: a name component "gate" (Mixtral,
    Qwen2-MoE, OLMoE), one with "router" in it (Llama 4, PhiMoE, DBRX's `router.layer`, Switch's
    `router.classifier`, Gemma 3n's `modality_router`) or one ending in "expert_gate" (Qwen2-MoE's
    `shared_expert_gate`). A router's outputs choose each token's experts: pruning it changes which weights run,
    not only what they compute. Projections named after a gate (`gate_proj`, `gate_up_proj`) are not routers."""
    return any(part == "gate" or "router" in part or part.endswith("expert_gate") for part in name.split("."))


def _not_linear_reason(module: nn.Module) -> str:
    if isinstance(module, Conv1D):
        return (
            "Conv1D (GPT-2's linear layer) stores its weight transposed (in_features x out_features); hf-sparse's "
            "masks, compact checkpoints and 2:4 kernels take nn.Linear's (out_features x in_features)"
        )
    return f"{type(module).__name__} is not an nn.Linear"


def _head_names(model: nn.Module) -> set[int]:
    heads = set()
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        try:
            output = get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output = None
        if output is not None:
            heads.add(id(output))
    return heads


def _adapter_names(named: list[tuple[str, nn.Module]]) -> tuple[set[str], set[str]]:
    """PEFT's wrappers in a model: (names of the tuner layers that wrap a `base_layer`, names of the adapter
    modules, whose whole subtrees are never pruned).

    Duck-typed on the attributes PEFT's `BaseTunerLayer` and `ModulesToSaveWrapper` define (`adapter_layer_names`
    names the adapters' `ModuleDict`s: `lora_A`, `lora_B`, `modules_to_save`, ...), so `peft` is not imported.
    """
    tuners, adapters = set(), set()
    for name, module in named:
        adapter_layers = getattr(module, "adapter_layer_names", None)
        if not isinstance(adapter_layers, tuple):
            continue
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            tuners.add(name)
        adapters.update(f"{name}.{layer}" for layer in adapter_layers)
        if isinstance(getattr(module, "original_module", None), nn.Module):
            # modules_to_save: PEFT trains a dense copy; the original is unused while the adapter is active.
            adapters.add(f"{name}.original_module")
    return tuners, adapters


def _default_match(module: nn.Module, name: str, heads: set[int]) -> bool:
    """Whether the default selection takes `module`: an nn.Linear inside a block, neither a head (`lm_head`, tied
    or not) nor a router. A GPT-2 Conv1D inside a block is taken too, to be reported as one that cannot be pruned."""
    from transformers.pytorch_utils import Conv1D

    block = block_of(name)
    if block is None or id(module) in heads or not isinstance(module, (nn.Linear, Conv1D)):
        return False
    return not is_router(name[len(block) + 1 :])


def _is_under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def select_layers(model: nn.Module, config: SparsityConfig) -> Selection:
    """Finds the layers `config` selects in `model`.

    Default (no `target_modules`): every `nn.Linear` inside the repeated transformer blocks (a decoder LLM's
    attention and MLP projections: q/k/v/o, gate/up/down, fused ones such as Phi-3's `qkv_proj` and `gate_up_proj`),
    never an embedding, a norm, the output head (`lm_head`, tied to the embeddings or not) or a mixture-of-experts
    router (`is_router`); GPT-2's `Conv1D` layers are reported in `Selection.skipped`, as they cannot be pruned. With
    `target_modules`, every module whose name matches; matched modules that cannot hold an N:M weight (not an
    `nn.Linear`, or an input dimension not divisible by M) are reported in `Selection.skipped`, and so is a layer
    whose weight is the same tensor as an earlier selected layer's (tied weights are pruned once, through the first).

    On a PEFT model the base layers are selected (`...query.base_layer`, matched by the name of the layer PEFT
    wraps, `...query`) and the adapters never are: `lora_A`, `lora_B`, `modules_to_save` and the like stay dense.

    Raises:
        ValueError: if the selection matches no module at all, naming the patterns and some module names.
    """
    targets: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    owners: dict[int, str] = {}  # id of a weight -> the first selected layer holding it
    heads = _head_names(model)
    named = [(name, module) for name, module in model.named_modules() if name]
    tuners, adapters = _adapter_names(named)
    for name, module in named:
        if name in tuners or _is_under(name, adapters):
            continue  # a PEFT wrapper (its base_layer is matched under its name) or an adapter
        parent = name.rpartition(".")[0]
        # A PEFT base layer is selected by the name of the layer it replaced (`...query`, not `...base_layer`).
        match_name = parent if parent in tuners and name.endswith(".base_layer") else name
        if config.target_modules is None:
            if not _default_match(module, match_name, heads):
                continue
        elif not _matches(match_name, config.target_modules):
            continue
        if config.exclude_modules is not None and _matches(match_name, config.exclude_modules):
            continue
        if not isinstance(module, nn.Linear):
            if config.target_modules is not None and any(isinstance(child, nn.Linear) for child in module.modules()):
                # A container matched by a pattern (e.g. "attention"): its Linear children are matched by name
                # only if a pattern matches them too, so say how to select them.
                skipped[name] = f"{type(module).__name__} is a container; name its nn.Linear children to prune them"
            else:
                skipped[name] = _not_linear_reason(module)
            continue
        if module.in_features % config.m != 0:
            skipped[name] = f"in_features={module.in_features} is not divisible by M={config.m}"
            continue
        owner = owners.setdefault(id(module.weight), name)
        if owner != name:
            # Tied weights: one tensor, one mask. Selecting it twice would prune (and restore) it twice.
            skipped[name] = f"shares its weight with {owner}, which is pruned (one mask for the one tensor)"
            continue
        targets[name] = module

    if not targets:
        what = (
            f"target_modules={config.target_modules}"
            if config.target_modules is not None
            else "the default selection (nn.Linear layers inside repeated transformer blocks)"
        )
        if config.exclude_modules:
            what += f" minus exclude_modules={config.exclude_modules}"
        examples = [name for name, module in named if isinstance(module, nn.Linear)][:8] or [n for n, _ in named][:8]
        found = "matched only modules that cannot be pruned" if skipped else "matched no module"
        raise ValueError(
            f"{what} {found} in {type(model).__name__}. Some nn.Linear names that exist: {examples}. "
            "Pass target_modules as full-match regular expressions or trailing names (e.g. 'query', "
            r"'.*\.mlp\..*')." + (f"\n{Selection({}, skipped).format_skipped()}" if skipped else "")
        )
    return Selection(targets=targets, skipped=skipped)
