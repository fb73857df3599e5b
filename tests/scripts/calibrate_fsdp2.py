"""Run by tests/test_calibration_llm.py with two CPU processes (torchrun, gloo): Wanda or SparseGPT masks of a tiny
Llama sharded with FSDP2 (`fully_shard` on every block and the model; each rank holds half of every weight's rows),
with the blocks run on stored inputs ("auto") and by running the model again for each block ("none"). Each rank
computes the masks of its own rows; gathered, they must be those of the same model unsharded. Writes rank{R}.json."""

import copy
import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from hf_sparse import SparsityConfig, select_layers
from hf_sparse._distributed import full_tensor, shut_down
from hf_sparse.criteria import compute_masks
from tests.test_calibration_llm import calibration_data, tiny_llama


def gathered(mask: torch.Tensor) -> torch.Tensor:
    parts = [torch.zeros_like(mask, dtype=torch.uint8) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mask.to(torch.uint8))
    return torch.cat(parts).bool()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main():
    out, criterion = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    config = SparsityConfig(criterion=criterion, calibration_samples=8, calibration_batch_size=4)
    dense = tiny_llama(blocks=3)
    data = calibration_data()
    # The reference: the unsharded model (a replica on each rank: rank 0 calibrates and broadcasts)
    reference = copy.deepcopy(dense)
    reference_masks = compute_masks(reference, select_layers(reference, config).targets, config, data)
    result = {"rank": dist.get_rank()}
    lines = Lines()
    logger = logging.getLogger("hf_sparse.calibration")
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    for mode in ("auto", "none"):
        model = copy.deepcopy(dense)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        layers = select_layers(model, config).targets
        lines.lines.clear()
        masks = compute_masks(model, layers, config, data, block_inputs=mode)
        result[mode] = {
            "on_stored_inputs": any(
                "model.layers: calibration runs blocks 0-2 on stored inputs" in line for line in lines.lines
            ),
            "local_rows": int(masks["model.layers.0.mlp.up_proj"].shape[0]),
            # compared on the CPU: where CUDA is visible, fully_shard moves the shards to the GPU
            "masks_equal_unsharded": all(
                torch.equal(gathered(m).cpu(), reference_masks[n].cpu()) for n, m in masks.items()
            ),
            "weights_equal_unsharded": all(
                torch.equal(full_tensor(layers[n].weight).cpu(), reference.get_submodule(n).weight.cpu())
                for n in masks
            ),
        }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    shut_down()


if __name__ == "__main__":
    main()
