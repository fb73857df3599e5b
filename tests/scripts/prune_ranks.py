"""Run by tests/test_criteria.py with two CPU processes (torchrun, gloo): `prune_` with a calibrated criterion
on replicas that start (deliberately) from different weights and calibration data (SparseGPT with its bias update
and ADMM masks). Rank 0 calibrates alone and
broadcasts, so every rank must end with rank 0's masks and weights. Writes rank{R}.json to OUT."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import BertForQuestionAnswering

from hf_sparse import SparsityConfig, prune_
from hf_sparse._distributed import masks_digest
from hf_sparse.masks import is_nm
from tests.conftest import RandomQADataset, exit_ranks, tiny_bert_config


def main():
    out, criterion = Path(sys.argv[1]), sys.argv[2]
    options = {"sparsegpt_update_bias": True, "sparsegpt_admm_steps": 5} if criterion == "sparsegpt" else {}
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different replicas on purpose: rank 0's must win
    model = BertForQuestionAnswering(tiny_bert_config())
    data = [RandomQADataset(size=16)[i + 100 * rank] for i in range(16)]
    masks = prune_(
        model, SparsityConfig(criterion=criterion, calibration_samples=16, **options), calibration_data=data
    )
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
    pruned = {n: weights[f"{n}.weight"] for n in masks}
    # What rank 0 alone computes from its own model: the reference every rank must match.
    torch.manual_seed(0)
    reference = BertForQuestionAnswering(tiny_bert_config())
    reference_data = [RandomQADataset(size=16)[i] for i in range(16)]
    dist.barrier()
    result = {
        "rank": rank,
        "mask_digest": masks_digest(masks),
        "weights_digest": masks_digest({n: w != 0 for n, w in pruned.items()}),
        "all_2_4": all(is_nm(w) for w in pruned.values()),
        "masks_follow_weights": all(torch.equal(pruned[n] != 0, m) for n, m in masks.items()),
        "weights_sum": float(sum(w.double().sum() for w in pruned.values())),
        "biases_sum": float(sum(model.get_submodule(n).bias.double().sum() for n in masks)),
    }
    if rank == 0:
        dist.destroy_process_group()  # the reference runs without a process group, as a single process would
        ref_masks = prune_(
            reference,
            SparsityConfig(criterion=criterion, calibration_samples=16, **options),
            calibration_data=reference_data,
        )
        result["reference_digest"] = masks_digest(ref_masks)
        result["reference_weights_sum"] = float(
            sum(reference.get_submodule(n).weight.detach().double().sum() for n in ref_masks)
        )
        result["reference_biases_sum"] = float(
            sum(reference.get_submodule(n).bias.detach().double().sum() for n in ref_masks)
        )
    else:
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_ranks()
