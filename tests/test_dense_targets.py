"""SparseGPT with dense targets (asymmetric calibration): each layer fits the dense model's outputs on the dense
model's inputs, from statistics that pair its inputs in the pruned model with its inputs in the dense one."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_sparse import SparsityConfig, prune_, select_layers
from hf_sparse.calibration import block_statistics, calibration_batches, prepare_batch
from hf_sparse.criteria import compute_masks
from hf_sparse.masks import nm_mask
from hf_sparse.refit import dense_target_weight
from tests.test_calibration_llm import calibration_data, tiny_llama

CPU = torch.device("cpu")


def test_the_dense_target_weight_is_the_least_squares_fit_of_the_dense_outputs():
    g = torch.Generator().manual_seed(0)
    x_pruned, x_dense = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    weight = torch.randn(8, 16, generator=g)
    fitted = dense_target_weight(weight, x_dense.T @ x_pruned, x_pruned.T @ x_pruned, damping=1e-7)
    expected = torch.linalg.lstsq(x_pruned, x_dense @ weight.T).solution.T
    torch.testing.assert_close(fitted, expected, rtol=1e-4, atol=1e-4)
    # inputs that earlier pruning left unchanged: the dense weight itself, whatever the damping
    hessian = x_dense.T @ x_dense
    torch.testing.assert_close(
        dense_target_weight(weight, hessian, hessian, damping=0.1), weight, rtol=1e-4, atol=1e-4
    )


def _inputs(model, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Every real token's inputs of the layers `names`, running the whole model (the reference)."""
    modules, seen = dict(model.named_modules()), {name: [] for name in names}
    hooks = [
        modules[name].register_forward_pre_hook(lambda module, args, name=name: seen[name].append(args[0]))
        for name in names
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    masks = [batch["attention_mask"].bool().reshape(-1) for batch in batches]
    return {
        name: torch.cat([x.reshape(-1, x.shape[-1])[m] for x, m in zip(calls, masks)]) for name, calls in seen.items()
    }


def test_statistics_pair_each_layers_inputs_in_the_pruned_model_with_its_inputs_in_the_dense_one():
    model = tiny_llama(blocks=3)
    dense = copy.deepcopy(model)
    config = SparsityConfig(criterion="sparsegpt", sparsegpt_dense_targets=True)
    layers = select_layers(model, config).targets
    data = calibration_data()
    batches = [
        prepare_batch(model, batch, CPU, index) for index, batch in enumerate(calibration_batches(data, config))
    ]
    groups = block_statistics(model, layers, batches, hessian=True, device=CPU, dense_targets=True)
    first = next(groups)
    for stat in first.values():  # nothing pruned yet: both streams are the dense model's
        torch.testing.assert_close(stat.cross, stat.hessian)
    with torch.no_grad():
        for name in first:  # prune block 0 (magnitude) as a caller would
            layers[name].weight.mul_(nm_mask(layers[name].weight, 2, 4))
    second = next(groups)
    pruned_inputs, dense_inputs = _inputs(model, list(second), data), _inputs(dense, list(second), data)
    for name, stat in second.items():
        x, x_dense = pruned_inputs[name], dense_inputs[name]
        assert stat.tokens == x.shape[0]
        torch.testing.assert_close(stat.hessian, x.T @ x, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stat.cross, x_dense.T @ x, rtol=1e-4, atol=1e-3)
        assert not torch.allclose(stat.cross, stat.hessian, rtol=1e-3)  # the streams differ after block 0's pruning


def test_pruning_with_dense_targets_records_it_and_changes_only_the_layers_after_the_first_block():
    dense = tiny_llama(blocks=3)
    data = calibration_data()
    results = {}
    for targets in (False, True):
        model = copy.deepcopy(dense)
        prune_(model, SparsityConfig(criterion="sparsegpt", sparsegpt_dense_targets=targets), calibration_data=data)
        assert model.config.sparsity["criterion_options"]["sparsegpt_dense_targets"] is targets
        results[targets] = model.state_dict()
    plain, retargeted = results[False], results[True]
    for name, weight in retargeted.items():
        if ".mlp." not in name and ".self_attn." not in name:
            continue
        if name.startswith("model.layers.0."):  # block 0's inputs are the same in both streams
            torch.testing.assert_close(weight, plain[name], rtol=1e-4, atol=1e-5)
        else:
            assert not torch.allclose(weight, plain[name], rtol=1e-3), name
        assert (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1).max() <= 2, name


def test_dense_targets_refuse_sequential_calibration_and_blocks_without_stored_inputs():
    with pytest.raises(ValueError, match="sparsegpt_dense_targets=True.*sequential_calibration=False"):
        SparsityConfig(criterion="sparsegpt", sparsegpt_dense_targets=True, sequential_calibration=True)
    model = tiny_llama(blocks=2)
    before = copy.deepcopy(model.state_dict())
    config = SparsityConfig(criterion="sparsegpt", sparsegpt_dense_targets=True)
    with pytest.raises(ValueError, match="sparsegpt_dense_targets=True needs .*block_inputs .*got 'none'"):
        compute_masks(model, select_layers(model, config).targets, config, calibration_data(), block_inputs="none")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
