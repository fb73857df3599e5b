"""Run by tests/test_distillation.py with two CPU processes (torchrun, gloo): a student sharded with FSDP2
(`fully_shard`, as `accelerate launch` with fsdp_version 2 leaves it) and DistillationLoss from a dense copy. The
teacher must be sharded like the student on first use (half of its rows on each rank) and give the same loss as a
full replica of it. Writes rank{R}.json to OUT."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import BertForQuestionAnswering

from hf_sparse import DistillationLoss
from hf_sparse._distributed import is_sharded, local_tensor
from tests.conftest import RandomQADataset, exit_ranks, tiny_bert_config


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    student = BertForQuestionAnswering(tiny_bert_config()).eval()  # no dropout: two forwards, one loss
    teacher = copy.deepcopy(student)
    replica = copy.deepcopy(student)
    with torch.no_grad():  # the student moves away from the teacher, so the loss is not zero
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for layer in student.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(student)
    sharded_loss = DistillationLoss(teacher, student, task_weight=0.0)
    data = RandomQADataset(size=8)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}
    loss = sharded_loss(student(**batch))
    sharded_loss.remove()
    replicated_loss = DistillationLoss(replica, student, task_weight=0.0, shard_teacher=False)
    reference = replicated_loss(student(**batch))
    query = teacher.bert.encoder.layer[0].attention.self.query.weight
    result = {
        "rank": dist.get_rank(),
        "teacher_sharded": all(is_sharded(p) for p in teacher.parameters()),
        "replica_sharded": any(is_sharded(p) for p in replica.parameters()),
        "teacher_local_rows": int(local_tensor(query).shape[0]),
        "teacher_full_rows": int(query.shape[0]),
        "loss": loss.item(),
        "replica_loss": reference.item(),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    exit_ranks()


if __name__ == "__main__":
    main()
