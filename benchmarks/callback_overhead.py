"""What `SparsityCallback` costs: training-step time with and without it, and mask computation time.

    python -m benchmarks.callback_overhead            # the tiny CPU test model, and BERT-large masks
    python -m benchmarks.callback_overhead --device cuda --hidden_size 768 --num_layers 12

Both trainings run in the same process on the same model and data; the figure is the median of per-step
wall-clock times after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import BertConfig, BertForQuestionAnswering, Trainer, TrainerCallback, TrainingArguments

from hf_sparse import SparsityCallback
from hf_sparse.masks import nm_mask


class _StepTimer(TrainerCallback):
    def __init__(self, device):
        self.device, self.times, self._start = device, [], None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


class _Features(torch.utils.data.Dataset):
    def __init__(self, size, seq_len, vocab_size):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab_size, (size, seq_len), generator=g)
        self.pos = torch.randint(0, seq_len, (size, 2), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "start_positions": self.pos[i, 0], "end_positions": self.pos[i, 1]}


def time_training(config: BertConfig, with_callback: bool, steps: int, warmup: int, batch: int, seq_len: int, device):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(config)
    timer = _StepTimer(device)
    callbacks = [SparsityCallback(), timer] if with_callback else [timer]
    args = TrainingArguments(
        "/tmp/hf_sparse_overhead", max_steps=steps + warmup, per_device_train_batch_size=batch, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu", seed=0,
    )  # fmt: skip
    data = _Features(batch * (steps + warmup), seq_len, config.vocab_size)
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return statistics.median(timer.times[warmup:])


def time_masks(hidden: int, layers: int, device, dtype=torch.float32, repeats: int = 5) -> float:
    """Seconds to compute 2:4 masks for every encoder nn.Linear of a BERT with this hidden size and depth."""
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
    weights = [torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes for _ in range(layers)]
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for w in weights:
            nm_mask(w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--hidden_size", type=int, default=64, help="Of the trained model (default: the CPU test model)."
    )
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="Write the results here.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = BertConfig(
        vocab_size=128 if args.hidden_size <= 128 else 30522, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=max(args.hidden_size // 64, 2),
        intermediate_size=4 * args.hidden_size if args.hidden_size > 64 else 128, max_position_embeddings=512,
    )  # fmt: skip
    results = {"device": str(device), "hidden_size": args.hidden_size, "num_layers": args.num_layers}
    run = dict(steps=args.steps, warmup=args.warmup, batch=args.batch, seq_len=args.seq_len, device=device)
    # Interleave the two, twice, so that drift of a shared machine hits both alike.
    dense, sparse = [], []
    for _ in range(2):
        dense.append(time_training(config, False, **run))
        sparse.append(time_training(config, True, **run))
    results["step_ms_without_callback"] = 1e3 * statistics.median(dense)
    results["step_ms_with_callback"] = 1e3 * statistics.median(sparse)
    results["overhead"] = results["step_ms_with_callback"] / results["step_ms_without_callback"] - 1
    results["bert_large_masks_s"] = time_masks(1024, 24, device)
    print(f"training step, median of {args.steps} steps after {args.warmup} warm-up (x2 runs each), {device}:")
    print(f"  without SparsityCallback: {results['step_ms_without_callback']:.2f} ms")
    print(f"  with SparsityCallback:    {results['step_ms_with_callback']:.2f} ms  ({results['overhead']:+.1%})")
    print(
        f"2:4 masks of every encoder nn.Linear of a BERT-large (fp32, {device}): {results['bert_large_masks_s']:.3f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
