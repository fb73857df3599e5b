"""Steady-state throughput and peak memory of 2:4 recovery training (SparsityCallback, Wanda masks at step 0, and
DistillationLoss from the dense copy) under whatever `accelerate launch` starts: one GPU, DDP or FSDP2. Used by
tests/scripts/two_gpu_check.sh and tests/test_two_gpu.py; runs on CPU processes too (gloo), slowly.

    accelerate launch --config_file recipes/accelerate_ddp.yaml tests/scripts/train_throughput.py OUT_DIR \\
        [--steps 60] [--warmup 10] [--batch 32] [--seq 128] [--teacher sharded|replicated|none] [--config base|tiny]

Writes OUT_DIR/rank{R}.json: samples/s over the steps after `--warmup` (all ranks' samples), peak memory of this
rank (GiB), the masks' digest after training began and at the end, and whether the final weights are exactly 2:4.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForQuestionAnswering, Trainer, TrainerCallback, TrainingArguments

from hf_sparse import DistillationLoss, SparsityCallback, SparsityConfig
from hf_sparse._distributed import full_tensor, is_sharded, local_tensor, masks_digest
from hf_sparse.masks import is_nm
from tests.conftest import RandomQADataset

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


class Clock(TrainerCallback):
    """Wall time from the end of step `warmup` to the end of training, synchronized with the GPU."""

    def __init__(self, sparsity: SparsityCallback, warmup: int):
        self.sparsity, self.warmup = sparsity, warmup
        self.start = self.end = None
        self.first_digest = None

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.first_digest = masks_digest(self.sparsity.masks)
        if state.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        if state.global_step == state.max_steps:
            self._sync()
            self.end = time.perf_counter()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--teacher", choices=["sharded", "replicated", "none"], default="sharded")
    parser.add_argument("--config", choices=["base", "tiny"], default="base")
    parser.add_argument("--use_cpu", action="store_true")
    options = parser.parse_args()
    args = TrainingArguments(
        str(options.out), max_steps=options.steps, per_device_train_batch_size=options.batch, learning_rate=1e-4,
        report_to="none", save_strategy="no", logging_steps=10_000, seed=0, disable_tqdm=True,
        use_cpu=options.use_cpu, dataloader_drop_last=True,
    )  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, max_position_embeddings=512, **(BERT_BASE if options.config == "base" else TINY)
    )
    model = BertForQuestionAnswering(config)
    sparsity = SparsityCallback(SparsityConfig(criterion="wanda", calibration_samples=64))
    clock = Clock(sparsity, options.warmup)
    loss = None
    if options.teacher != "none":
        teacher = copy.deepcopy(model)
        loss = DistillationLoss(teacher, model, task_weight=1.0, shard_teacher=options.teacher == "sharded")
    size = options.batch * args.world_size * (options.steps + 1)
    data = RandomQADataset(size, options.seq, config.vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[sparsity, clock], compute_loss_func=loss)
    if torch.cuda.is_available() and not options.use_cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    layers = sparsity.layers
    teacher_params = loss.teacher.parameters() if loss else []
    samples = (options.steps - options.warmup) * options.batch * args.world_size
    result = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "distributed": str(trainer.accelerator.distributed_type),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not options.use_cpu else "cpu",
        "teacher": options.teacher,
        "teacher_sharded": any(is_sharded(p) for p in teacher_params) if loss else None,
        "teacher_bytes_on_rank": sum(local_tensor(p).numel() * p.element_size() for p in loss.teacher.parameters())
        if loss
        else 0,
        "per_device_batch": options.batch,
        "seq_len": options.seq,
        "samples_per_second": samples / (clock.end - clock.start),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available() and not options.use_cpu
        else None,
        "mask_digest_step1": clock.first_digest,
        "final_weights_2_4": all(is_nm(full_tensor(layer.weight)) for layer in layers.values()),
        "layers": len(layers),
    }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / f"rank{args.process_index}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
