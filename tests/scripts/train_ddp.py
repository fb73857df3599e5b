"""Run by tests/test_callback.py through `accelerate launch --cpu --num_processes 2`: trains a tiny BERT QA model
with SparsityCallback under DDP (gloo) and writes, per rank, digests of the masks and final weights."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import BertForQuestionAnswering, Trainer, TrainerCallback, TrainingArguments

from hf_sparse import SparsityCallback
from hf_sparse.masks import is_nm
from tests.conftest import RandomQADataset, exit_ranks, tiny_bert_config


def digest(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Probe(TrainerCallback):
    def __init__(self, sparsity):
        self.sparsity, self.mask_digest, self.violations = sparsity, None, []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.mask_digest = digest({k: v.to(torch.uint8) for k, v in self.sparsity.masks.items()})
        self.violations += [n for n, layer in self.sparsity.layers.items() if not is_nm(layer.weight)]


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    sparsity = SparsityCallback()
    probe = Probe(sparsity)
    args = TrainingArguments(
        str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, report_to="none",
        save_strategy="no", seed=0, disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=RandomQADataset(), callbacks=[sparsity, probe])
    trainer.train()
    trainer.save_model(str(out / "final"))
    state = trainer.accelerator.state
    result = {
        "world_size": state.num_processes,
        "mask_digest": probe.mask_digest,
        "weight_digest": digest(dict(model.state_dict())),
        "all_nm": all(is_nm(layer.weight) for layer in sparsity.layers.values()),
        "violations": probe.violations,
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_ranks()
