"""Activation-aware criteria: Wanda and SparseGPT masks, block-sequential calibration, and the callback's data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertForQuestionAnswering, Trainer, TrainingArguments

from hf_sparse import SparsityCallback, SparsityConfig, prune_, sparsity_report
from hf_sparse.blocks import input_groups
from hf_sparse.calibration import block_statistics, calibration_batches, prepare_batch
from hf_sparse.criteria import compute_masks, sparsegpt_prune_, wanda_mask
from hf_sparse.masks import nm_mask
from hf_sparse.refit import admm_mask, output_error, refit_kept
from hf_sparse.selection import select_layers
from tests.conftest import RandomQADataset, tiny_bert_config


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Stack(nn.Module):
    """Linear blocks in an nn.ModuleList, so the default selection prunes `layers.<i>.fc`."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(Block(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.seen_masks = []

    def forward(self, x, attention_mask=None):
        self.seen_masks.append(attention_mask)
        for block in self.layers:
            x = block(x)
        return x


def _correlated_inputs(tokens: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) * torch.logspace(-1, 1, dim)[None, :]
    return torch.randn(tokens, dim, generator=g) @ mixing


def test_wanda_keeps_small_weight_with_large_input_norm():
    model = Stack([4, 1])
    with torch.no_grad():
        model.layers[0].fc.weight.copy_(torch.tensor([[0.1, 1.0, 0.5, 0.9]]))
    x = torch.ones(2, 8, 4) * torch.tensor([100.0, 1.0, 1.0, 0.001])
    masks = prune_(model, SparsityConfig(criterion="wanda"), calibration_data=[{"x": x}])
    # |w| * ||x||: 0.1*100 and 1.0*1 beat 0.5*1 and 0.9*0.001, although magnitude would keep 1.0 and 0.9.
    assert masks["layers.0.fc"].tolist() == [[True, True, False, False]]
    assert model.layers[0].fc.weight.tolist() == [[pytest.approx(0.1), 1.0, 0.0, 0.0]]
    assert wanda_mask(torch.tensor([[0.1, 1.0, 0.5, 0.9]]), torch.tensor([1e4, 1.0, 1.0, 1e-6])).tolist() == [
        [True, True, False, False]
    ]


def test_wanda_ignores_padding_tokens():
    model = Stack([4, 1])
    with torch.no_grad():
        model.layers[0].fc.weight.copy_(torch.tensor([[0.1, 1.0, 0.5, 0.9]]))
    x = torch.ones(1, 4, 4)
    x[0, 3] = torch.tensor([1000.0, 0.0, 0.0, 1000.0])  # a padded position with huge activations
    masks = prune_(
        model,
        SparsityConfig(criterion="wanda"),
        calibration_data=[{"x": x, "attention_mask": torch.tensor([[1, 1, 1, 0]])}],
    )
    # Real tokens are all ones, so magnitude order decides (keep 1.0 and 0.9); counting the padded position would
    # have kept 0.1 and 0.9 (scores 100 and 900).
    assert masks["layers.0.fc"].tolist() == [[False, True, False, True]]


def _output_error(layer_weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ layer_weight.T - x @ pruned.T).pow(2).sum())


def test_sparsegpt_lowers_output_error_against_magnitude_and_wanda():
    torch.manual_seed(0)
    dense = Stack([64, 32])
    x = _correlated_inputs(512, 64, seed=1)
    errors = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        masks = prune_(model, SparsityConfig(criterion=criterion), calibration_data=[{"x": x[None]}])
        weight = model.layers[0].fc.weight.detach()
        assert torch.equal(weight != 0, masks["layers.0.fc"]) and sparsity_report(model)[0].is_nm
        errors[criterion] = _output_error(dense.layers[0].fc.weight.detach(), weight, x)
    # Measured: magnitude 881509, wanda 817060, sparsegpt 726721.
    assert errors["sparsegpt"] < 0.9 * errors["wanda"] and errors["wanda"] < 0.95 * errors["magnitude"], errors
    # SparseGPT changes the kept weights (its OBS update); Wanda and magnitude only zero some.
    kept = masks["layers.0.fc"]
    assert not torch.allclose(weight[kept], dense.layers[0].fc.weight.detach()[kept])


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_masks_are_exact_nm_on_a_bert(criterion, pattern):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    config = SparsityConfig(criterion=criterion, sparsity_pattern=pattern, calibration_samples=8)
    data = [{"input_ids": torch.randint(0, 128, (16,)).tolist()} for _ in range(12)]
    masks = prune_(model, config, calibration_data=data)
    assert sorted(masks) == sorted(select_layers(model, config).targets)
    for name, mask in masks.items():
        assert (mask.reshape(-1, config.m).sum(dim=1) == config.n).all(), name
    report = sparsity_report(model, config.n, config.m, layers=list(masks))
    assert all(r.is_nm for r in report)
    assert sum(r.zeros for r in report) == sum(r.numel for r in report) * (config.m - config.n) // config.m
    assert model.training  # the train/eval mode is restored


def test_later_blocks_are_calibrated_on_pruned_earlier_blocks():
    model = Stack([4, 4, 1])
    with torch.no_grad():
        # Inputs are all ones, so block 0 keeps its two largest |w| per row: its outputs go from
        # [2.02, 1.1, 1.05, 0.6] (dense) to [2.0, 0.1, 1.0, 0.4] (pruned).
        model.layers[0].fc.weight.copy_(
            torch.tensor([[1.0, 1.0, 0.01, 0.01], [1.0, -0.9, 0.5, 0.5], [0.5, 0.5, 0.03, 0.02], [0.2, 0.2, 0.1, 0.1]])
        )
        model.layers[1].fc.weight.fill_(1.0)  # equal magnitudes: the input norms alone decide block 1's mask
    masks = prune_(model, SparsityConfig(criterion="wanda"), calibration_data=[{"x": torch.ones(1, 3, 4)}])
    assert masks["layers.0.fc"].tolist() == [[True, True, False, False]] * 4
    # Block 1 keeps inputs 0 and 2, the largest after block 0 is pruned; its dense inputs would have kept 0 and 1.
    assert masks["layers.1.fc"].tolist() == [[True, False, True, False]]


def test_sparsegpt_bias_update_absorbs_the_pruning_error():
    # GELU outputs, as a feed-forward output layer sees them: a mean per feature, which pruning shifts
    g = torch.Generator().manual_seed(2)
    x = nn.functional.gelu(0.3 * torch.randn(2048, 64, generator=g) + 0.5 * torch.randn(64, generator=g))
    torch.manual_seed(0)
    weight, bias = torch.randn(32, 64), torch.randn(32)
    target = x @ weight.T + bias
    plain = weight.clone()
    sparsegpt_prune_(plain, x.T @ x)
    with_bias, new_bias = weight.clone(), bias.clone()
    ones = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    mask = sparsegpt_prune_(with_bias, ones.T @ ones, bias=new_bias)
    assert torch.equal(with_bias != 0, mask) and (mask.reshape(-1, 4).sum(dim=1) == 2).all()
    error_plain = ((x @ plain.T + bias - target) ** 2).mean()
    error_bias = ((x @ with_bias.T + new_bias - target) ** 2).mean()
    assert not torch.allclose(new_bias, bias)
    assert error_bias < 0.95 * error_plain, (error_bias, error_plain)  # measured: 0.157 against 0.174
    with pytest.raises(ValueError, match=r"fc: Hessian of shape \(64, 64\) does not match in_features=64 plus one"):
        sparsegpt_prune_(weight.clone(), x.T @ x, bias=bias.clone(), name="fc")


def test_refit_solves_each_rows_least_squares_under_its_mask():
    x = _correlated_inputs(512, 32, seed=3)
    H = x.T @ x
    torch.manual_seed(0)
    dense = torch.randn(8, 32)
    sgpt = dense.clone()
    mask = sparsegpt_prune_(sgpt, H)
    refit = refit_kept(dense, H, mask, damping=0.0)
    assert torch.equal(refit != 0, mask)
    for row in range(8):  # each row: the least-squares fit of the dense row's outputs on its kept inputs
        kept = mask[row].nonzero().squeeze(1)
        expected = torch.linalg.lstsq(x[:, kept].double(), (x @ dense[row]).double()[:, None]).solution.squeeze(1)
        torch.testing.assert_close(refit[row, kept].double(), expected, rtol=1e-3, atol=1e-4)
    assert output_error(dense, refit, H) < 0.95 * output_error(dense, sgpt, H)
    uneven = mask.clone()
    uneven[0, mask[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="fc: every row of the mask must keep the same number"):
        refit_kept(dense, H, uneven, name="fc")


@pytest.mark.parametrize("with_bias", [False, True])
def test_conjugate_gradient_refit_gives_the_cholesky_weights(with_bias):
    # Ill-conditioned, as real activations are: correlated inputs with two outlier channels 30x larger
    x = _correlated_inputs(2048, 64, seed=5)
    x[:, [3, 40]] *= 30.0
    if with_bias:
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    H = x.T @ x
    torch.manual_seed(0)
    dense = torch.randn(24, x.shape[1])
    sgpt = dense[:, :64].clone()
    mask = sparsegpt_prune_(sgpt, x[:, :64].T @ x[:, :64])
    cholesky = refit_kept(dense, H, mask, method="cholesky")
    for start in (None, torch.cat([sgpt, dense[:, 64:]], dim=1)):
        cg = refit_kept(dense, H, mask, method="cg", start=start)
        assert torch.equal(cg[:, :64] != 0, mask)
        torch.testing.assert_close(cg, cholesky, rtol=0, atol=2e-3 * cholesky.abs().max().item())
        assert output_error(dense, cg, H) == pytest.approx(output_error(dense, cholesky, H), rel=1e-4)
    assert torch.equal(refit_kept(dense, H, mask), cholesky)  # "auto" on the CPU: Cholesky
    with pytest.raises(ValueError, match="fc: refit method must be 'auto', 'cholesky' or 'cg'; got 'lu'"):
        refit_kept(dense, H, mask, method="lu", name="fc")


def test_conjugate_gradients_that_cannot_reach_the_tolerance_stop_and_say_so(caplog):
    from hf_sparse.refit import _conjugate_gradients

    x = _correlated_inputs(512, 32, seed=1)
    H = x.T @ x + 0.01 * torch.eye(32)
    torch.manual_seed(0)
    dense = torch.randn(4, 32)
    mask = nm_mask(dense)
    with caplog.at_level("WARNING", logger="hf_sparse.criteria"):
        w = _conjugate_gradients(H, dense @ (x.T @ x), mask, dense, "fc", tol=0.0)
    assert "fc: the refit stopped after 320 conjugate-gradient steps" in caplog.text
    assert "asked 0" in caplog.text
    assert torch.equal(w != 0, mask) and torch.isfinite(w).all()
    # A row with a non-finite weight stops at once (NaN, as from Cholesky); the others are solved, zero outside the mask
    solved = _conjugate_gradients(H, dense @ (x.T @ x), mask, dense, "fc")
    dense[1, 0] = float("nan")
    w = _conjugate_gradients(H, dense @ (x.T @ x), mask, dense, "fc")
    torch.testing.assert_close(w[[0, 2, 3]], solved[[0, 2, 3]])
    assert w[1, mask[1]].isnan().all() and (w[~mask] == 0).all()


def test_a_bad_refit_method_is_refused_even_without_a_refit():
    with pytest.raises(ValueError, match="fc: refit method must be 'auto', 'cholesky' or 'cg'; got 'lu'"):
        sparsegpt_prune_(torch.randn(4, 8), torch.eye(8), refit_method="lu", name="fc")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the refit picks conjugate gradients there)"
)
def test_on_a_gpu_large_rows_are_refit_by_conjugate_gradients_to_the_same_weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2048, device="cuda", generator=g) @ torch.randn(2048, 2048, device="cuda", generator=g)
    H = x.T @ x
    dense = torch.randn(256, 2048, device="cuda", generator=g)
    mask = nm_mask(dense)
    auto = refit_kept(dense, H, mask)  # 1024 kept weights per row: conjugate gradients
    cholesky = refit_kept(dense, H, mask, method="cholesky")
    torch.testing.assert_close(auto, refit_kept(dense, H, mask, method="cg"))
    assert output_error(dense, auto, H) == pytest.approx(output_error(dense, cholesky, H), rel=1e-4)


def test_sparsegpt_refit_and_admm_lower_the_layer_error_step_by_step():
    # Low-rank GELU activations, as a feed-forward output layer sees them
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1024, 16, generator=g) @ torch.randn(16, 64, generator=g)
    x = nn.functional.gelu(z + 0.3 * torch.randn(1024, 64, generator=g))
    H = x.T @ x
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    errors, masks = {}, {}
    for name, options in {"sgpt": {}, "refit": {"refit": True}, "admm": {"admm_steps": 30}}.items():
        pruned = weight.clone()
        masks[name] = sparsegpt_prune_(pruned, H, **options)
        assert torch.equal(pruned != 0, masks[name]) and (masks[name].reshape(-1, 4).sum(dim=1) == 2).all()
        errors[name] = output_error(weight, pruned, H)
    assert torch.equal(masks["refit"], masks["sgpt"])  # the refit keeps SparseGPT's mask
    assert not torch.equal(masks["admm"], masks["sgpt"])  # ADMM's mask won on this layer
    # Measured relative to SparseGPT: refit 0.638, admm 0.559.
    assert errors["admm"] < 0.93 * errors["refit"] and errors["refit"] < 0.8 * errors["sgpt"], errors
    # With a bias (a constant input, never pruned): the mask covers the weight only, the bias is refit too
    ones = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    pruned, bias = weight.clone(), torch.randn(48)
    dense = torch.cat([weight, bias[:, None]], dim=1)
    assert admm_mask(dense, ones.T @ ones, steps=30).shape == weight.shape
    new_bias = bias.clone()
    sparsegpt_prune_(pruned, ones.T @ ones, bias=new_bias, admm_steps=30)
    assert output_error(dense, torch.cat([pruned, new_bias[:, None]], dim=1), ones.T @ ones) < errors["admm"]


def test_sequential_calibration_groups_layers_by_input_in_forward_order():
    model = BertForQuestionAnswering(tiny_bert_config())
    layers = select_layers(model, SparsityConfig()).targets
    batch = {"input_ids": torch.randint(0, 128, (2, 16))}
    groups = [[name.split("layer.")[1] for name in names] for _, names in input_groups(model, layers, batch)]
    per_block = [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ]
    expected = [[f"{i}.{name}" for name in group] for i in range(2) for group in per_block]
    assert groups == expected


def test_sequential_calibration_sees_the_earlier_groups_of_the_block_pruned():
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config()).eval()
    layers = select_layers(model, SparsityConfig()).targets
    batches = [{"input_ids": torch.randint(0, 128, (2, 16))}]
    calibration = [prepare_batch(model, batches[0], torch.device("cpu"))]
    groups = block_statistics(model, layers, calibration, hessian=True, device=torch.device("cpu"), sequential=True)
    first = next(groups)
    assert sorted(first) == sorted(n for n in layers if n.startswith("bert.encoder.layer.0.attention.self"))
    for name in first:
        layers[name].weight.data.zero_()  # "prune" the first group
    second = next(groups)
    assert list(second) == ["bert.encoder.layer.0.attention.output.dense"]
    # Its statistics are those of the model with query/key/value zeroed, not of the dense model.
    seen = []
    handle = layers["bert.encoder.layer.0.attention.output.dense"].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    model(**batches[0])
    handle.remove()
    torch.testing.assert_close(second["bert.encoder.layer.0.attention.output.dense"].hessian, seen[0].T @ seen[0])
    groups.close()


@pytest.mark.parametrize("reconstruction", [{}, {"sparsegpt_admm_steps": 10}])
def test_sparsegpt_options_prune_a_bert_to_exact_24_and_change_only_its_layers(reconstruction):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    dense = copy.deepcopy(model)
    config = SparsityConfig(
        criterion="sparsegpt",
        calibration_samples=8,
        sequential_calibration=True,
        sparsegpt_update_bias=True,
        **reconstruction,
    )
    data = [{"input_ids": torch.randint(0, 128, (16,)).tolist()} for _ in range(8)]
    layers = select_layers(model, config).targets
    batches = [prepare_batch(model, batch, torch.device("cpu")) for batch in calibration_batches(data, config)]
    stats = block_statistics(model, layers, batches, True, torch.device("cpu"), True, constant_input=True)
    assert all(s.hessian.shape == (65, 65) for s in next(stats).values())  # hidden 64, plus the constant input
    stats.close()
    masks = prune_(model, config, calibration_data=data)
    assert all(r.is_nm for r in sparsity_report(model, layers=list(masks)))
    pruned_parameters = {f"{name}.{kind}" for name in masks for kind in ("weight", "bias")}
    for name, parameter in model.named_parameters():  # nothing outside the pruned layers changed
        if name not in pruned_parameters:
            assert torch.equal(parameter, dense.get_parameter(name)), name
    changed_bias = [n for n in masks if not torch.equal(model.get_submodule(n).bias, dense.get_submodule(n).bias)]
    assert sorted(changed_bias) == sorted(masks)  # every pruned layer's bias absorbed part of its error


def test_calibration_batches_pads_examples_and_stops_at_calibration_samples():
    config = SparsityConfig(criterion="wanda", calibration_samples=5, calibration_batch_size=2)
    examples = [{"input_ids": list(range(1, 2 + i)), "context": "text"} for i in range(9)]
    batches = calibration_batches(examples, config, pad_token_id=0)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 2), (2, 4), (1, 5)]
    assert batches[1]["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 3, 4]]
    assert batches[1]["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert "context" not in batches[0]
    loader = torch.utils.data.DataLoader([{"input_ids": torch.arange(4)}] * 12, batch_size=4)
    assert [b["input_ids"].shape[0] for b in calibration_batches(loader, config)] == [4, 1]
    with pytest.raises(ValueError, match="criterion='wanda' needs calibration data"):
        calibration_batches(None, config)
    with pytest.raises(TypeError, match="Tokenize text first"):
        calibration_batches("some text", config)


def test_calibration_that_never_reaches_a_layer_names_it():
    model = Stack([8, 8])
    config = SparsityConfig(criterion="wanda")
    layers = {"layers.0.fc": model.layers[0].fc, "extra.fc": nn.Linear(8, 8)}
    with pytest.raises(ValueError, match="extra.fc saw no calibration tokens"):
        compute_masks(model, layers, config, [{"x": torch.randn(1, 4, 8)}])


def test_callback_wanda_calibrates_on_the_train_dataloader(tmp_path):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    initial = copy.deepcopy(model)
    train = RandomQADataset(size=24)
    config = SparsityConfig(criterion="wanda", calibration_samples=64, calibration_batch_size=32)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=train, callbacks=[SparsityCallback(config)]).train()
    names = list(select_layers(model, config).targets)
    trained = {n: model.get_submodule(n).weight.detach() for n in names}

    # The same criterion on all 24 training examples by hand gives the same weights (lr=0 keeps them)...
    by_hand = copy.deepcopy(initial)
    prune_(by_hand, config, calibration_data=[train[i] for i in range(len(train))])
    assert all(torch.equal(trained[n], by_hand.get_submodule(n).weight) for n in names)
    # ...and differs from magnitude pruning and from Wanda on other data, so the data did decide the masks.
    magnitude = copy.deepcopy(initial)
    prune_(magnitude)
    assert not all(torch.equal(trained[n] != 0, magnitude.get_submodule(n).weight != 0) for n in names)
    other = copy.deepcopy(initial)
    prune_(other, config, calibration_data=[RandomQADataset(size=24, seq_len=8)[i] for i in range(24)])
    assert not all(torch.equal(trained[n] != 0, other.get_submodule(n).weight != 0) for n in names)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_two_processes_end_with_rank_0_masks_and_weights(tmp_path, criterion):
    # Replicas that differ on purpose (weights and calibration data): rank 0 calibrates alone and broadcasts.
    from tests.conftest import torchrun_two_ranks

    ranks = torchrun_two_ranks("prune_ranks.py", tmp_path, criterion)
    assert ranks[0]["mask_digest"] == ranks[1]["mask_digest"] == ranks[0]["reference_digest"]
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"] == ranks[0]["reference_weights_sum"]
    assert ranks[0]["biases_sum"] == ranks[1]["biases_sum"] == ranks[0]["reference_biases_sum"]  # SparseGPT's bias
    assert all(r["all_2_4"] and r["masks_follow_weights"] for r in ranks)


@pytest.mark.parametrize("damping", [0.01, 0.1])
def test_refit_keeps_the_dense_weights_in_directions_the_calibration_never_saw(damping):
    # 6 tokens for 32 inputs: the Hessian has rank 6. Along every direction of the kept inputs that the tokens do not
    # span, the refit weights must be the dense ones (as magnitude keeps them), not pulled to zero.
    x = _correlated_inputs(6, 32, seed=4)
    torch.manual_seed(0)
    dense = torch.randn(8, 32)
    mask = nm_mask(dense)
    refit = refit_kept(dense, x.T @ x, mask, damping=damping)
    for row in range(8):
        kept = mask[row].nonzero().squeeze(1)
        unseen = torch.linalg.svd(x[:, kept].double(), full_matrices=True).Vh[6:]  # null space of X_S, 10 directions
        torch.testing.assert_close(
            unseen @ refit[row, kept].double(), unseen @ dense[row, kept].double(), rtol=1e-4, atol=1e-4
        )


def test_sparsegpt_on_fewer_tokens_than_inputs_warns_naming_the_layers(caplog):
    model = BertForQuestionAnswering(tiny_bert_config())  # hidden 64, intermediate 128
    data = [{"input_ids": torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))} for i in range(12)]
    with caplog.at_level("WARNING", logger="hf_sparse.criteria"):
        prune_(copy.deepcopy(model), SparsityConfig(criterion="sparsegpt"), calibration_data=data[:2])
    assert (
        "sparsegpt calibrated 12 of 12 layer(s) on fewer tokens than they have inputs "
        "(bert.encoder.layer.0.attention.self.query: 32 tokens for 64 inputs)" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_sparse.criteria"):
        prune_(model, SparsityConfig(criterion="sparsegpt"), calibration_data=data)  # 192 tokens
    assert "fewer tokens" not in caplog.text
