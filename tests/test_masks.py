import pytest
import torch

from hf_sparse import sparsity_report
from hf_sparse.masks import format_report, is_nm, nm_mask, nm_mask_from_scores


def test_keeps_the_two_largest_magnitudes_of_each_group_of_four():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.3]])
    assert nm_mask(weight).tolist() == [[False, True, True, False, True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_masks_are_exactly_n_m_on_any_float_dtype(dtype, n, m):
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = nm_mask(weight, n, m)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert (mask.reshape(-1, m).sum(1) == n).all()
    pruned = weight * mask
    assert is_nm(pruned, n, m) and not is_nm(weight, n, m)
    # The kept weights are the largest of their group: every kept |w| >= every dropped |w|.
    groups, keep = weight.abs().float().reshape(-1, m), mask.reshape(-1, m)
    kept_min = groups.masked_fill(~keep, float("inf")).min(1).values
    dropped_max = groups.masked_fill(keep, -1.0).max(1).values
    assert (kept_min >= dropped_max).all()


def test_ties_break_towards_the_lower_index_and_pruning_is_idempotent():
    assert nm_mask(torch.ones(1, 4)).tolist() == [[True, True, False, False]]
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    once = weight * nm_mask(weight)
    twice = once * nm_mask(once)
    assert torch.equal(once, twice)
    assert torch.equal(nm_mask(once), nm_mask(weight))


def test_a_group_with_fewer_than_n_nonzeros_keeps_its_nonzero():
    weight = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    assert nm_mask(weight).tolist() == [[True, False, False, True]]
    assert is_nm(weight)


def test_errors_name_the_tensor_and_say_what_is_wrong():
    with pytest.raises(
        ValueError,
        match=r"encoder.fc: the last \(input\) dimension of a tensor of shape \(3, 6\) is not divisible by M=4",
    ):
        nm_mask(torch.randn(3, 6), name="encoder.fc")
    with pytest.raises(ValueError, match="fc: scores contain NaN"):
        nm_mask_from_scores(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), name="fc")
    assert not is_nm(torch.zeros(2, 6))


def test_sparsity_report_per_layer(tiny_qa_model):
    from hf_sparse import prune_

    masks = prune_(tiny_qa_model)
    report = {row.name: row for row in sparsity_report(tiny_qa_model)}
    assert set(masks) < set(report)
    for name in masks:
        assert report[name].is_nm and report[name].sparsity == 0.5
    assert not report["qa_outputs"].is_nm
    text = format_report(list(report.values()))
    assert "bert.encoder.layer.0.attention.self.query" in text and "NO" in text
    with pytest.raises(ValueError, match=r"no module named \['nope'\]"):
        sparsity_report(tiny_qa_model, layers=["nope"])


def test_a_sparsity_report_prints_as_a_table_and_stays_a_list_of_rows(tiny_qa_model):
    from hf_sparse import prune_

    masks = prune_(tiny_qa_model)
    report = sparsity_report(tiny_qa_model)
    lines = str(report).splitlines()
    assert lines[0].split() == ["layer", "shape", "sparsity", "N:M"]
    assert lines[1].split() == ["bert.encoder.layer.0.attention.self.query", "64x64", "50.00%", "yes"]
    assert lines[-2].split() == ["qa_outputs", "2x64", "0.00%", "NO"]
    assert lines[-1].split() == ["total", "65,664", "49.90%", "12/13"] and len(lines) == 15
    assert f"{report}" == str(report)  # print(), f-strings and logging all show the table
    # Still the list of rows that code iterates, indexes and filters.
    assert isinstance(report, list) and len(report) == 13 and report[0].name == next(iter(masks))
    assert [row.name for row in report if not row.is_nm] == ["qa_outputs"]
    assert report.sparsity == sum(r.zeros for r in report) / sum(r.numel for r in report)
