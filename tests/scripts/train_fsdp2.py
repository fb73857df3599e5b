"""Run by tests/test_callback.py with two CPU processes (torchrun, gloo): drives SparsityCallback through the
Trainer's events on a model sharded with FSDP2 (`fully_shard`), where each rank holds half of every weight's rows.
The Trainer does not shard on CPU (accelerate turns FSDP off there), so the loop is written out; the callback sees
exactly what it sees under `accelerate launch --use_fsdp --fsdp_version 2` on GPUs."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import BertForQuestionAnswering, TrainerControl, TrainerState, TrainingArguments

from hf_sparse import SparsityCallback, SparsityConfig, select_layers
from hf_sparse.masks import is_nm, nm_mask
from tests.conftest import RandomQADataset, exit_ranks, tiny_bert_config


def build(seed=0):
    torch.manual_seed(seed)
    model = BertForQuestionAnswering(tiny_bert_config())
    reference = {name: nm_mask(layer.weight) for name, layer in select_layers(model, SparsityConfig()).targets.items()}
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model, reference


def train(model, callback, args, state, steps):
    control = TrainerControl()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = RandomQADataset(size=64)
    callback.on_train_begin(args, state, control, model=model)
    for _ in range(steps):
        rank = dist.get_rank()
        batch = [data[(4 * state.global_step + i) * 2 + rank] for i in range(4)]
        inputs = {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
        model(**inputs).loss.backward()
        callback.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        callback.on_optimizer_step(args, state, control)
        optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, control)


def main():
    out = Path(sys.argv[1])
    args = TrainingArguments(str(out), use_cpu=True, report_to="none")
    model, reference = build()
    callback = SparsityCallback()
    state = TrainerState()
    train(model, callback, args, state, steps=2)
    local_masks = {name: mask.clone() for name, mask in callback.masks.items()}
    (out / "checkpoint-2").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    callback.on_save(args, state, TrainerControl())
    dist.barrier()
    # A resumed run: a fresh callback on the same sharded model finds this rank's masks in the checkpoint.
    resumed = SparsityCallback()
    resumed.on_train_begin(args, state, TrainerControl(), model=model)
    restored_equal = all(torch.equal(resumed.masks[n], m) for n, m in local_masks.items())
    train(model, resumed, args, state, steps=2)
    resumed.on_train_end(args, state, TrainerControl())
    full = {name: layer.weight.full_tensor() for name, layer in resumed.layers.items()}
    gathered_masks = {}
    for name, mask in local_masks.items():
        parts = [torch.zeros_like(mask, dtype=torch.uint8) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mask.to(torch.uint8))
        gathered_masks[name] = torch.cat(parts).bool()
    result = {
        "rank": dist.get_rank(),
        "local_rows": int(next(iter(local_masks.values())).shape[0]),
        "full_rows": int(next(iter(full.values())).shape[0]),
        "sharded_masks_equal_unsharded": all(torch.equal(gathered_masks[n], reference[n]) for n in reference),
        "restored_equal": restored_equal,
        "mask_files": sorted(p.name for p in (out / "checkpoint-2").iterdir()),
        "full_weights_nm": all(is_nm(w) for w in full.values()),
        "full_weights_follow_masks": all(torch.equal(full[n] != 0, gathered_masks[n]) for n in full),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    exit_ranks()


if __name__ == "__main__":
    main()
