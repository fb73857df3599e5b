"""Generation benchmark: tokens per second of greedy `generate()` for a dense causal LM and its 2:4, FP8 2:4 and
dense FP8 copies, dense measured in the same process, every model generating with the same `GenerationSettings`
(transformers' static KV cache, the decode step under `torch.compile(mode="reduce-overhead")`, by default).

Models: Llama-shaped ones with random weights (speed does not depend on the values) magnitude-pruned to 2:4, the
Llama-3 vocabulary (128256) and its head kept dense, or a causal-LM folder (`--model DIR`, e.g. SmolLM2-135M-Instruct,
pruned to 2:4 unless it already is). Each model and dtype builds the variants once (`swap_to_semi_structured_`,
tuned at the decode token counts = the batch sizes and at the prefill ones = batch x prompt), then times every batch
size, dense first. A variant that cannot run here (2:4 kernels on the CPU, FP8 below compute capability 8.9, a swap or
a compile that fails) is kept in the results with the reason. `--check-generations N` also counts, per variant, the
prompts whose greedy generation equals the masked dense model's (each prompt alone, eager, `--check-new-tokens`).
Writes `--output` (JSON, rewritten after every measurement, so a run cut short keeps what it measured), with every
variant's swap report (kernel per layer and token bucket) and each phase's seconds.

    python -m hf_sparse.inference.generate_bench --models llama-1b --dtypes bfloat16
    python -m hf_sparse.inference.generate_bench --models llama-8b --dtypes float16 --batches 1 16
    python -m hf_sparse.inference.generate_bench --model smollm2-135m-instruct --check-generations 50

Rough time on one H100 (a first run also tunes each GEMM shape, cached in ~/.cache/hf_sparse for later runs): every
(variant, batch size) compiles its decode step once (tens of seconds for a 1B, more for an 8B), and each generate()
call of 512 + 256 tokens takes about 256 x the decode step (a few ms at batch 1). Give one model and one dtype per
600 s call for the 8B shape, and `--compile-mode none` (eager decode, no compilation) to see the kernels alone.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..lm.generation import (
    COMPILE_MODES,
    GenerationSettings,
    greedy_agreement,
    greedy_generations,
    prompt_ids,
    time_generation,
)

LLAMA_3 = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
               max_position_embeddings=8192)  # fmt: skip
SHAPES: dict[str, dict] = {
    "llama-1b": dict(
        LLAMA_3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True
    ),
    "llama-8b": dict(LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
    # for tests and a first try on the CPU: the GEMM shapes mean nothing there
    "tiny": dict(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),  # fmt: skip
}
VARIANTS = ("dense", "2:4", "fp8-2:4", "fp8-dense")
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_PROMPTS = "../shared/data/squad/squad-v2-dev-sample.json"


@dataclass
class GenerateBenchArguments:
    """What `python -m hf_sparse.inference.generate_bench` measures (each field is an option, `--new-tokens` for
    `new_tokens`)."""

    models: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"Llama shapes with random weights: {list(SHAPES)}. Default: llama-1b, or none with --model."
        },
    )
    model: str | None = field(default=None, metadata={"help": "A causal-LM folder to time too (e.g. SmolLM2)."})
    dtypes: list[str] = field(
        default_factory=lambda: ["bfloat16", "float16"],
        metadata={"help": f"Weight and activation dtypes, from {list(DTYPES)} (2:4 kernels refuse float32)."},
    )
    batches: list[int] = field(default_factory=lambda: [1, 4, 16, 64], metadata={"help": "Batch sizes to time."})
    prompt_tokens: int = field(default=512, metadata={"help": "Tokens of every prompt (random ids)."})
    new_tokens: int = field(default=256, metadata={"help": "Tokens generated per row, end of sequence ignored."})
    repeats: int = field(default=3, metadata={"help": "Timed generate() calls per row (the median is kept), after one "
                                                      "untimed warm-up call."})  # fmt: skip
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS),
        metadata={"help": f"From {list(VARIANTS)}; 'dense' is always timed (the baseline)."},
    )
    cache: str = field(default="static", metadata={"help": "KV cache of generate(): 'static' or 'dynamic'."})
    compile_mode: str = field(
        default="reduce-overhead",
        metadata={"help": f"torch.compile mode of the decode step, from {list(COMPILE_MODES)}, or 'none' (eager)."},
    )
    fp8_scales: str = field(
        default="static",
        metadata={
            "help": "Activation scales of the FP8 variants: 'static' (calibrated on 4 random prompts) or "
            "'dynamic' (per token)."
        },  # fmt: skip
    )
    tune_seconds: float = field(default=4.0, metadata={"help": "Autotuning budget per kernel, GEMM and token count."})
    autotune_cache: str | None = field(
        default=None, metadata={"help": "Autotuning cache file (default: $HF_SPARSE_CACHE or ~/.cache/hf_sparse)."}
    )
    check_generations: int = field(
        default=0,
        metadata={
            "help": "Prompts on which to compare each variant's greedy generation with the masked dense "
            "model's (0: no check)."
        },  # fmt: skip
    )
    check_new_tokens: int = field(default=32, metadata={"help": "New tokens per prompt of the check."})
    prompts: str = field(
        default=DEFAULT_PROMPTS,
        metadata={
            "help": "The check's prompts: a SQuAD JSON file (its questions, in order) or a text file (one "
            "prompt per line). Models without a tokenizer get random token prompts."
        },  # fmt: skip
    )
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "Where to run."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and prompts."})
    output: str = field(default="generate_bench.json", metadata={"help": "The JSON file to write."})

    def __post_init__(self):
        if not self.models and self.model is None:
            self.models = ["llama-1b"]
        for name, given, known in (("models", self.models, SHAPES), ("dtypes", self.dtypes, DTYPES),
                                   ("variants", self.variants, VARIANTS)):  # fmt: skip
            unknown = [v for v in given if v not in known]
            if unknown or not given and name != "models":
                raise ValueError(f"--{name}: {unknown or 'none given'}; choose from {list(known)}.")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"--batches must be positive integers; got {self.batches}.")
        for name in ("prompt_tokens", "new_tokens", "repeats", "check_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}.")
        if self.check_generations < 0:
            raise ValueError(f"--check-generations must be 0 (no check) or more; got {self.check_generations}.")
        if self.compile_mode not in (*COMPILE_MODES, "none"):
            raise ValueError(f"--compile-mode: {self.compile_mode!r}; choose from {[*COMPILE_MODES, 'none']}.")
        if self.cache not in ("static", "dynamic") or self.fp8_scales not in ("static", "dynamic"):
            raise ValueError(f"--cache and --fp8-scales take 'static' or 'dynamic'; got {self.cache!r}, "
                             f"{self.fp8_scales!r}.")  # fmt: skip
        if self.compile_mode != "none" and self.cache != "static":
            raise ValueError("--compile-mode needs --cache static (transformers compiles the decode step only with a "
                             "static cache); pass --compile-mode none for a dynamic cache.")  # fmt: skip
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"--model {self.model}: no config.json there; give a causal-LM folder.")
        self.variants = [v for v in VARIANTS if v in self.variants or v == "dense"]
        self.batches = sorted(set(self.batches))

    @property
    def settings(self) -> GenerationSettings:
        """How every variant generates."""
        return GenerationSettings(self.cache, None if self.compile_mode == "none" else self.compile_mode)


def parse_args(argv: list[str] | None = None) -> GenerateBenchArguments:
    """Parses and checks the command line (exits with a message that names the option on bad values)."""
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(GenerateBenchArguments, prog="python -m hf_sparse.inference.generate_bench",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        parser.error(str(err))
    return args


# -- the models ------------------------------------------------------------------------------------------------------


def build_model(name: str, args: GenerateBenchArguments, dtype: torch.dtype) -> tuple[nn.Module, object | None]:
    """(model, tokenizer or None): a Llama shape with random weights (seeded), or the folder `--model`."""
    if name in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        config = LlamaConfig(**SHAPES[name])
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the dtype: an 8B in fp32 first would need 32 GB more
        try:
            with torch.device(args.device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        return model.eval(), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(args.device).eval()
    return model, AutoTokenizer.from_pretrained(name)


def check_prompts(args: GenerateBenchArguments, tokenizer, vocab_size: int) -> list[list[int]]:
    """The equality check's prompts: the first `check_generations` questions of the SQuAD file (or lines of a text
    file), through the chat template where the tokenizer has one; random 32-token prompts for a model without one."""
    count = args.check_generations
    if tokenizer is None:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab_size, (count, 32), generator=generator).tolist()
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file; give a SQuAD JSON file or a text file with one "
                                "prompt per line.")  # fmt: skip
    if path.suffix == ".json":
        from ..squad import read_squad_json

        texts = list(dict.fromkeys(r["question"].strip() for r in read_squad_json(path)))
    else:
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(texts) < count:
        raise ValueError(f"--prompts {path} holds {len(texts)} prompts; --check-generations asks for {count}.")
    return prompt_ids(tokenizer, texts[:count])


def build_variant(variant: str, base: nn.Module, args: GenerateBenchArguments, tuner) -> tuple[nn.Module, list]:
    """The pruned `base` as `variant` and its swap report rows: a swapped copy, or for dense `base` itself with q/k/v
    fused as the swap fuses them (built last: the swaps read its plain layers). Raises RuntimeError with the reason
    where the variant cannot run here."""
    from .benchmark import swap_report_rows
    from .fp8 import Fp8Config, fp8_support_problem
    from .kernels.cusparselt import semi_structured_support
    from .swap import fuse_qkv_, swap_to_semi_structured_

    if variant == "dense":
        fuse_qkv_(base)
        return base, []
    problem = semi_structured_support(args.device, next(base.parameters()).dtype) if "2:4" in variant else None
    if problem is None and variant.startswith("fp8"):
        problem = fp8_support_problem(args.device)
    if problem:
        raise RuntimeError(problem)
    fp8 = False
    if variant.startswith("fp8"):
        generator = torch.Generator().manual_seed(args.seed + 1)
        calibration = [{"input_ids": torch.randint(0, base.config.vocab_size, (2, args.prompt_tokens),
                                                   generator=generator).to(args.device)} for _ in range(4)]  # fmt: skip
        fp8 = Fp8Config(args.fp8_scales, calibration if args.fp8_scales == "static" else None,
                        sparse=variant == "fp8-2:4")  # fmt: skip
    counts = sorted({*args.batches, *(b * args.prompt_tokens for b in args.batches)})  # decode and prefill
    model = copy.deepcopy(base)
    report = swap_to_semi_structured_(model, token_counts=counts, autotune=tuner, fp8=fp8)
    print(f"\n{variant}:\n{report.format()}", flush=True)
    return model, swap_report_rows(report)


# -- the run ---------------------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    import transformers

    from .. import __version__

    facts = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
             "hf_sparse": __version__}  # fmt: skip
    if torch.device(device).type == "cuda":
        from .autotune import device_facts

        facts.update(device_facts(device))
    return facts


class Recorder:
    """The results, written to `path` after every change (a run cut short keeps what it measured)."""

    def __init__(self, path: str, args: GenerateBenchArguments):
        self.path = Path(path)
        self.data = {"environment": environment(args.device), "args": asdict(args),
                     "settings": asdict(args.settings), "command": "python -m hf_sparse.inference.generate_bench "
                     + " ".join(sys.argv[1:]), "runs": []}  # fmt: skip

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def run(args: GenerateBenchArguments) -> dict:
    """Builds and times every model, dtype, variant and batch size of `args`; returns what `--output` holds."""
    from .autotune import Autotuner

    recorder = Recorder(args.output, args)
    tuner = Autotuner(cache_path=args.autotune_cache, time_budget_s=args.tune_seconds)
    print(f"{recorder.data['environment']}; generate() with {recorder.data['settings']}", flush=True)
    for name in [*args.models, *([args.model] if args.model else [])]:
        for dtype_name in args.dtypes:
            entry = {"model": name, "dtype": dtype_name, "variants": {}, "rows": [], "seconds": {}}
            recorder.data["runs"].append(entry)
            run_one(args, name, getattr(torch, dtype_name), entry, recorder, tuner)
    return recorder.data


def run_one(args, name, dtype, entry, recorder, tuner) -> None:
    from .benchmark import prune_to_2_4

    start = time.perf_counter()
    base, tokenizer = build_model(name, args, dtype)
    entry["layers_2_4"] = len(prune_to_2_4(base))
    entry["seconds"]["build_and_prune"] = time.perf_counter() - start
    prompts = reference = None
    if args.check_generations:
        start = time.perf_counter()
        prompts = check_prompts(args, tokenizer, base.config.vocab_size)
        reference = greedy_generations(base, prompts, args.check_new_tokens, _pad_id(tokenizer, base))
        entry["seconds"]["check_reference"] = time.perf_counter() - start
    models: dict[str, nn.Module] = {}
    entry["variants"] = {v: {"reason": None} for v in args.variants}
    check = (prompts, reference, _pad_id(tokenizer, base)) if reference is not None else None
    for variant in [*args.variants[1:], "dense"]:  # dense last: it is `base`, fused in place
        model = build_and_check(variant, base, args, tuner, entry["variants"][variant], check)
        if model is not None:
            models[variant] = model
        recorder.save()
    models = {v: models[v] for v in args.variants if v in models}  # dense first in every row
    del base
    for batch in args.batches:
        row = time_batch(args, models, batch, name, dtype)
        row["variants"].update({v: {"reason": r["reason"]} for v, r in entry["variants"].items() if r["reason"]})
        entry["rows"].append(row)
        recorder.save()
    del models
    torch._dynamo.reset()  # the compiled decode steps and their CUDA graphs' memory go with the models
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()


def build_and_check(variant, base, args, tuner, record: dict, check: tuple | None) -> nn.Module | None:
    """Builds `variant` and, with `check` (prompts, reference generations, pad id), counts its greedy generations
    identical to the reference's. On failure it returns None and `record` holds the reason (never dropped)."""
    start = time.perf_counter()
    try:
        model, record["swap_report"] = build_variant(variant, base, args, tuner)
        record["build_seconds"] = time.perf_counter() - start
        if check is not None:
            start = time.perf_counter()
            agreement = greedy_agreement(model, check[1], check[0], args.check_new_tokens, check[2])
            record["generation_check"] = asdict(agreement)
            record["check_seconds"] = time.perf_counter() - start
            print(f"{variant}: {agreement.identical} of {agreement.prompts} greedy generations identical to the "
                  "masked dense model's", flush=True)  # fmt: skip
        return model
    except Exception as err:  # kept in the results with its reason, never silently dropped
        record["reason"] = str(err) if isinstance(err, RuntimeError) else f"{type(err).__name__}: {err}"
        print(f"{variant}: not run: {record['reason']}", flush=True)
        return None


def time_batch(args, models: dict[str, nn.Module], batch: int, name: str, dtype: torch.dtype) -> dict:
    """One row: every built variant's tokens/s at `batch`, and its ratio to dense's."""
    generator = torch.Generator().manual_seed(args.seed + batch)
    vocab = next(iter(models.values())).config.vocab_size if models else 1
    input_ids = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=generator)
    row: dict = {"batch": batch, "variants": {}}
    for variant, model in models.items():
        start = time.perf_counter()
        try:
            speed = time_generation(model, input_ids, args.new_tokens, args.repeats, args.settings)
            cell = {"tokens_per_second": speed.tokens_per_second, "seconds": speed.seconds,
                    "decode_compiled": speed.decode_compiled}  # fmt: skip
        except Exception as err:  # e.g. a compile or a capture that fails for one variant: the others still run
            cell = {"reason": f"{type(err).__name__}: {str(err)[:500]}"}
        cell["wall_seconds"] = time.perf_counter() - start
        row["variants"][variant] = cell
    dense = row["variants"].get("dense", {}).get("tokens_per_second")
    for cell in row["variants"].values():
        if dense and cell.get("tokens_per_second"):
            cell["ratio"] = cell["tokens_per_second"] / dense
    print(format_row(name, dtype, row, args.variants), flush=True)
    return row


def format_row(name: str, dtype: torch.dtype, row: dict, variants: list[str]) -> str:
    cells = [f"{name[-24:]:<24}", f"{str(dtype).removeprefix('torch.'):<9}", f"batch {row['batch']:>3}"]
    for variant in variants:
        cell = row["variants"].get(variant)
        if cell is None or "tokens_per_second" not in cell:
            cells.append(f"{variant} -")
            continue
        ratio = f" ({cell['ratio']:.2f}x)" if "ratio" in cell and variant != "dense" else ""
        cells.append(f"{variant} {cell['tokens_per_second']:.1f} tok/s{ratio}")
    return "  ".join(cells)


def _pad_id(tokenizer, model: nn.Module) -> int:
    from ..lm._model import pad_id_of

    if tokenizer is not None:
        return pad_id_of(tokenizer)
    return int(getattr(model.config, "pad_token_id", None) or getattr(model.config, "eos_token_id", None) or 0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
