"""Fast generate() settings and greedy agreement, on tiny Llamas on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_sparse.lm.generation import (
    GenerationSettings,
    decode_compiled,
    greedy_agreement,
    greedy_generations,
    time_generation,
)


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
