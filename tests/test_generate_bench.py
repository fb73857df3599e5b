"""Fast generate() settings, greedy agreement, and the generation benchmark, on tiny Llamas on the CPU (the 2:4 and FP8
variants run on a GPU only: here they are reported with the reason)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_sparse.inference import generate_bench
from hf_sparse.lm.generation import (
    GenerationSettings,
    decode_compiled,
    greedy_agreement,
    greedy_generations,
    time_generation,
)
from tests.conftest import shared_data

TINY = ["--models", "tiny", "--dtypes", "float32", "--batches", "1", "2", "--prompt-tokens", "8", "--new-tokens", "4",
        "--repeats", "1"]  # fmt: skip


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def random_prompts(count: int, length: int = 12, seed: int = 0) -> list[list[int]]:
    return torch.randint(3, 256, (count, length), generator=torch.Generator().manual_seed(seed)).tolist()


def test_static_cache_and_compiled_decode_generate_what_the_dynamic_cache_does():
    model = tiny_llama()
    prompts = random_prompts(3)
    dynamic = greedy_generations(copy.deepcopy(model), prompts, 16, settings=GenerationSettings("dynamic", None))
    static = greedy_generations(copy.deepcopy(model), prompts, 16, settings=GenerationSettings(compile_mode=None))
    compiled_model = copy.deepcopy(model)
    settings = GenerationSettings(compile_backend="eager", compile_on_cpu=True)  # dynamo traces, no inductor
    compiled = greedy_generations(compiled_model, prompts, 16, settings=settings)
    assert static == dynamic and compiled == dynamic
    assert all(len(g) == 16 for g in dynamic)  # a random model rarely ends a sequence: 16 tokens were compared
    assert decode_compiled(compiled_model) and not decode_compiled(model)
    speed = time_generation(compiled_model, torch.tensor(prompts[:2]), new_tokens=4, repeats=1, settings=settings)
    assert speed.decode_compiled and speed.settings == {"cache": "static", "compile_mode": "reduce-overhead",
                                                        "compile_backend": "eager", "compile_on_cpu": True}  # fmt: skip
    assert GenerationSettings().generate_kwargs()["cache_implementation"] == "static"
    assert GenerationSettings("dynamic", None).generate_kwargs() == {"disable_compile": True}


@pytest.mark.parametrize(
    "kwargs, named",
    [({"cache": "paged"}, "GenerationSettings.cache"), ({"compile_mode": "fast"}, "GenerationSettings.compile_mode"),
     ({"cache": "dynamic"}, "needs cache='static'")],
)  # fmt: skip
def test_generation_settings_name_the_bad_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        GenerationSettings(**kwargs)


def test_greedy_agreement_counts_identical_prompts():
    model = tiny_llama()
    prompts = random_prompts(4)
    same = greedy_agreement(copy.deepcopy(model), model, prompts, new_tokens=8)
    assert (same.identical, same.prompts, same.first_difference) == (4, 4, [None] * 4)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[0].mlp.down_proj.weight.add_(
            torch.randn_like(perturbed.model.layers[0].mlp.down_proj.weight)
        )
    other = greedy_agreement(perturbed, model, prompts, new_tokens=8)
    assert other.identical < 4 and sum(d is not None for d in other.first_difference) == 4 - other.identical
    reference = greedy_generations(model, prompts, 8)
    assert greedy_agreement(perturbed, reference, prompts, new_tokens=8) == other  # a reference run reused
    with pytest.raises(ValueError, match="reference holds 3 generations for 4 prompts"):
        greedy_agreement(model, reference[:3], prompts, new_tokens=8)


def test_the_benchmark_runs_on_the_cpu_with_every_variant_measured_or_explained(tmp_path, capsys):
    from transformers import AutoTokenizer  # noqa: F401 - the folder model's tokenizer loads through it

    from hf_sparse.lm import byte_tokenizer

    folder = tmp_path / "tiny-chat"
    tiny_llama(seed=1).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "bench.json"
    result = generate_bench.main([*TINY, "--model", str(folder), "--check-generations", "3", "--prompts",
                                  str(shared_data("squad", "squad-v2-dev-sample.json")), "--output", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["model"], r["dtype"]) for r in result["runs"]] == [("tiny", "float32"), (str(folder), "float32")]
    for entry in result["runs"]:
        assert list(entry["variants"]) == ["dense", "2:4", "fp8-2:4", "fp8-dense"]
        for variant in ("2:4", "fp8-2:4"):
            assert "need an NVIDIA GPU" in entry["variants"][variant]["reason"]
        assert "FP8 (e4m3) kernels need an NVIDIA GPU" in entry["variants"]["fp8-dense"]["reason"]
        assert [row["batch"] for row in entry["rows"]] == [1, 2]
        for row in entry["rows"]:
            assert set(row["variants"]) == {"dense", "2:4", "fp8-2:4", "fp8-dense"}
            dense = row["variants"]["dense"]
            assert dense["tokens_per_second"] > 0 and dense["ratio"] == 1.0 and dense["decode_compiled"] is False
            assert all("reason" in row["variants"][v] for v in ("2:4", "fp8-2:4", "fp8-dense"))
        check = entry["variants"]["dense"]["generation_check"]  # fused q/k/v against the masked dense model
        assert check["prompts"] == 3 and check["identical"] == 3
    assert result["settings"] == {"cache": "static", "compile_mode": "reduce-overhead", "compile_backend": "inductor",
                                  "compile_on_cpu": False}  # fmt: skip
    printed = capsys.readouterr().out
    assert "dense" in printed and "2:4: not run: 2:4 semi-structured kernels" in printed


def test_every_variant_generates_with_the_same_settings_and_gets_a_ratio(tmp_path, monkeypatch):
    """The bench's plumbing with stand-ins for the GPU-only variants (copies of the pruned model)."""
    real = generate_bench.build_variant
    seen = []

    def stand_in(variant, base, args, tuner):
        if variant == "dense":
            return real(variant, base, args, tuner)
        return copy.deepcopy(base), [{"name": "stand-in", "plans": {1: variant}}]

    def spy(model, input_ids, new_tokens, repeats, settings):
        seen.append((id(model), settings))
        return time_generation(model, input_ids, new_tokens, repeats, settings)

    monkeypatch.setattr(generate_bench, "build_variant", stand_in)
    monkeypatch.setattr(generate_bench, "time_generation", spy)
    result = generate_bench.main([*TINY, "--compile-mode", "none", "--output", str(tmp_path / "b.json")])
    (entry,) = result["runs"]
    assert len({model for model, _ in seen}) == 4 and len(seen) == 8  # 4 variants x 2 batch sizes
    assert {settings for _, settings in seen} == {GenerationSettings("static", None)}
    for row in entry["rows"]:
        assert all(cell["ratio"] > 0 for cell in row["variants"].values())
    saved = json.loads((tmp_path / "b.json").read_text())["runs"][0]["variants"]["fp8-2:4"]
    assert saved["swap_report"] == [{"name": "stand-in", "plans": {"1": "fp8-2:4"}}]


@pytest.mark.parametrize(
    "argv, named",
    [(["--batches", "0"], "--batches"), (["--dtypes", "float64"], "--dtypes"), (["--variants", "int4"], "--variants"),
     (["--models", "llama-70b"], "--models"), (["--new-tokens", "0"], "--new-tokens"),
     (["--cache", "dynamic"], "--compile-mode needs --cache static"), (["--model", "/nonexistent"], "--model"),
     (["--check-generations", "-1"], "--check-generations")],
)  # fmt: skip
def test_bad_arguments_name_the_option(argv, named, capsys):
    with pytest.raises(SystemExit):
        generate_bench.parse_args(argv)
    assert named in capsys.readouterr().err


def test_a_missing_prompt_file_is_named(tmp_path):
    args = generate_bench.parse_args(
        ["--models", "tiny", "--check-generations", "2", "--prompts", str(tmp_path / "x")]
    )
    with pytest.raises(FileNotFoundError, match="--prompts .*x: no such file"):
        generate_bench.check_prompts(args, object(), 260)


def test_a_compact_checkpoint_loads_into_a_model_whose_decode_step_compiles(tmp_path):
    from transformers import LlamaForCausalLM

    import hf_sparse

    model = tiny_llama()
    hf_sparse.prune_(model)
    hf_sparse.save_pretrained(model, tmp_path, compact=True)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    # loaded dense, the quantizer gone (a quantizer that is not `is_compileable` would make generate() run eagerly)
    assert getattr(loaded, "hf_quantizer", None) is None
    prompts = random_prompts(2)
    settings = GenerationSettings(compile_backend="eager", compile_on_cpu=True)
    assert greedy_generations(loaded, prompts, 8, settings=settings) == greedy_generations(model, prompts, 8)
    assert decode_compiled(loaded)
