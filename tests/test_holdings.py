"""What a 2:4 layer holds and runs per token bucket (`policy.py`, `holdings.py`), the decoder LLMs' defaults
(`swap.py`) and the layer that holds two layouts (`multi_layout.py`): fake timings, CPU only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sparse import prune_, restore_dense_, swap_to_semi_structured_
from hf_sparse.inference import policy
from hf_sparse.inference.holdings import Workload
from hf_sparse.inference.kernels import CUSPARSELT, TRITON_DECODE
from hf_sparse.inference.kernels.base import Run, Timing, token_bucket
from hf_sparse.inference.multi_layout import MultiLayoutLinear
from hf_sparse.inference.swap import GENERATION_TOKEN_COUNTS, decoder_lm
from tests.test_autotune import FakeTimings
from tests.test_inference import FP16_KERNELS, TileKernel, pruned_tiny_model
from tests.test_triton_decode import llama_units

KERNELS = (*FP16_KERNELS, TRITON_DECODE)


class GenerationTimings(FakeTimings):
    """Dense 1.2 ms everywhere; cuSPARSELt 1.5 ms at 1-64 tokens and 1.0 at 512; the decode kernel 0.7 ms at 1-64
    tokens and `prefill_ms` at 512."""

    def __init__(self, *args, prefill_ms=2.0, **kwargs):
        super().__init__(*args, sparse_from=512, **kwargs)
        self.prefill_ms = prefill_ms

    def measure(self, request):
        if request.kernel == "triton_decode":
            return Timing(0.7 if request.tokens <= 64 else self.prefill_ms, (1, 32, 256, 4, 4, 3), request.tokens, 5)
        return super().measure(request)


def decide(units, tuner, fallback, workload=None, counts=GENERATION_TOKEN_COUNTS, kernels=KERNELS):
    buckets = {}
    for tokens in counts:
        buckets.setdefault(token_bucket(tokens), tokens)
    options = policy.Options(policy.DenseFallback(fallback), tuner.min_speedup, buckets, workload=workload)
    in_play = policy.Kernels(kernels)
    needed = policy.requests(units, in_play, options)
    return policy.decide(units, in_play, dict(zip(needed, tuner.timings(needed, "cpu"))), options)


def test_one_layout_is_chosen_by_the_time_a_generation_spends_in_it():
    units = llama_units()
    # the decode kernel at 6 ms per prefill: over the token counts unweighted, cuSPARSELt is faster (7.0 ms against
    # 8.8); a generation of 256 new tokens runs the decode steps 256 times per prefill
    tuner = GenerationTimings(cache_path=False, prefill_ms=6.0)
    unweighted = decide(units, tuner, "none")
    assert {p.holds for p in unweighted} == {(CUSPARSELT,)}
    generation = decide(units, tuner, "compressed", Workload(prompt_tokens=512, new_tokens=256))
    assert {p.holds for p in generation} == {(TRITON_DECODE,)} and {p.status for p in generation} == {"sparse"}
    assert {r.kernel for p in generation for r in p.runs.values()} == {"triton_decode"}  # its prefill too
    dense = sum(p.unit.dense_bytes for p in generation)
    assert sum(k.weight_bytes(p.unit.shape, p.unit.dtype) for p in generation for k in p.holds) <= 0.57 * dense
    # 256 x 4 x 1.5 + 1.0 ms against 256 x 4 x 0.7 + 6.0
    assert "2.13x the cuSPARSELt GEMM over the tuned token counts (weighted by the workload)" in generation[0].reason


def test_a_decoder_layer_is_not_left_dense_at_decode_where_its_prefill_kernel_loses():
    units = llama_units()
    tuner = GenerationTimings(cache_path=False, prefill_ms=6.0)
    # cuSPARSELt alone (no decode kernel here): it loses at every decode step, and a generation weighs them; with no
    # dense copy allowed, the layer stays dense rather than run 1.5 ms decode steps
    alone = decide(units, tuner, "compressed", Workload(), kernels=FP16_KERNELS)
    assert {p.status for p in alone} == {"dense"} and "dense_fallback='compressed' keeps no dense copy" in alone[
        0
    ].reason
    assert "weighted by the workload" in alone[0].reason
    # with the decode kernel, it runs every decode step
    with_decode = decide(units, tuner, "compressed", Workload())
    assert all(p.runs[b].kernel == "triton_decode" for p in with_decode for b in (8, 16, 32, 64))


@pytest.mark.parametrize("fallback", ["copy", "auto"])
def test_where_memory_allows_two_layouts_each_bucket_runs_the_fastest_kernel(fallback):
    units = llama_units()
    plans = decide(units, GenerationTimings(cache_path=False, prefill_ms=6.0), fallback, Workload())
    two = [p for p in plans if len(p.layouts) == 2]
    assert two and all(p.holds == (TRITON_DECODE, CUSPARSELT) and p.status == "sparse+sparse" for p in two)
    plan = two[0]
    assert {b: r.kernel for b, r in plan.runs.items()} == {
        8: "triton_decode", 16: "triton_decode", 32: "triton_decode", 64: "triton_decode", 512: "cusparselt"
    }  # fmt: skip
    assert plan.runs[512] == Run("cusparselt", (3, 1, -1)) and not plan.keep_dense
    assert plan.times == {1: (1.2, 0.7), 16: (1.2, 0.7), 32: (1.2, 0.7), 64: (1.2, 0.7), 512: (1.2, 1.0)}
    assert (
        "each token count runs the faster kernel (speed-up over dense by tokens: 1: Triton decode kernel 1.71x, "
        "16: Triton decode kernel 1.71x, 32: Triton decode kernel 1.71x, 64: Triton decode kernel 1.71x, "
        "512: cuSPARSELt 1.20x)"
    ) in plan.reason
    dense = sum(p.unit.dense_bytes for p in plans)
    held = sum(k.weight_bytes(p.unit.shape, p.unit.dtype) for p in plans for k in p.holds)
    if fallback == "copy":  # a second layout in place of every dense copy: 2 x 9/16 of the dense bytes
        assert len(two) == len(plans) and held == pytest.approx(2 * dense * 9 / 16, rel=0.01)
        assert "in place of the dense copy dense_fallback='copy' allows" in plan.reason
    else:  # within the dense bytes: the layers that lose least per byte give their second layout up
        assert len(two) < len(plans) and held <= dense
        assert {p.holds for p in plans if len(p.layouts) == 1} == {(TRITON_DECODE,)}


def test_a_second_layout_is_held_only_where_it_runs_some_bucket_faster():
    units = llama_units()
    # the decode kernel at 0.9 ms per prefill: it beats cuSPARSELt at every token count, so it runs everywhere alone
    plans = decide(units, GenerationTimings(cache_path=False, prefill_ms=0.9), "copy", Workload())
    assert {p.holds for p in plans} == {(TRITON_DECODE,)} and {p.status for p in plans} == {"sparse"}
    # an encoder's swap without the decode kernel decides as before: one layout and a dense copy
    plans = decide(units, GenerationTimings(cache_path=False), "copy", counts=[1, 512], kernels=FP16_KERNELS)
    assert {p.holds for p in plans} == {(CUSPARSELT, FP16_KERNELS[0])} and {p.status for p in plans} == {
        "sparse+dense"
    }


def test_decoder_llms_are_the_models_that_generate_and_are_not_encoder_decoders():
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    assert decoder_lm(llama) == "LlamaForCausalLM generates"
    assert decoder_lm(pruned_tiny_model()) is None  # BertForQuestionAnswering: no generate()
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    assert decoder_lm(t5) is None  # its encoder runs whole prompts
    assert decoder_lm(nn.Linear(4, 4)) is None


class DecodeTile(TileKernel):
    """A second fake kernel of its own layout, fast at decode token counts (its layer computes densely, on the CPU)."""

    name, label = "decode-tile", "decode tile kernel"

    def shape_problem(self, shape, dtype):
        return None


class TwoKernelTimings(FakeTimings):
    """Dense 1.2 ms; the tile kernel 1.0 ms from 512 tokens, else 1.5; the decode tile 0.6 ms up to 64, else 3.0."""

    def measure(self, request):
        if request.kernel == "tile":
            return Timing(1.0 if request.tokens >= 512 else 1.5, (7,), request.tokens, 3)
        if request.kernel == "decode-tile":
            return Timing(0.6 if request.tokens <= 64 else 3.0, (2,), request.tokens, 3)
        return super().measure(request)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prune_(model)
    return model


@pytest.fixture
def two_fake_kernels(monkeypatch):
    from hf_sparse.inference import kernels

    monkeypatch.setattr(kernels, "KERNELS", (*kernels.KERNELS, TileKernel(), DecodeTile()))


def test_a_decoder_swap_takes_generation_defaults_and_says_so(two_fake_kernels):
    model = tiny_llama()
    tuner = TwoKernelTimings(cache_path=False)
    report = swap_to_semi_structured_(model, autotune=tuner, eager_graphs=False)
    assert sorted({r.tokens for r in tuner.calls}) == sorted(GENERATION_TOKEN_COUNTS)
    assert report.defaults.startswith(
        "decoder LLM (LlamaForCausalLM generates): token_counts=[1, 16, 32, 64, 512], dense_fallback='compressed' "
        "(no dense copies: the 2:4 layers hold at most their compressed bytes) by default; token counts weighted by "
        "the workload (a 512-token prompt, then 256 new tokens"
    )
    assert report.defaults in report.format()
    assert {r.status for r in report.two_four} == {"sparse"}  # one compressed layout each
    assert all(set(r.plans.values()) == {"tile 2"} for r in report.two_four)  # the decode kernel, prefill included
    # what the user names wins: their token counts and fallback; only the workload's weighting is said
    model = tiny_llama()
    report = swap_to_semi_structured_(model, token_counts=[1, 2048], dense_fallback="none", autotune=tuner,
                                      eager_graphs=False)  # fmt: skip
    assert "by default" not in report.defaults and "weighted by the workload" in report.defaults
    assert report.token_counts == [1, 2048]
    # other models keep the defaults they had
    bert = pruned_tiny_model(hidden_size=128, intermediate_size=256)
    report = swap_to_semi_structured_(bert, autotune=TwoKernelTimings(cache_path=False), eager_graphs=False)
    assert report.defaults == "" and report.token_counts == [512, 2048, 8192, 32768, 131072]


def test_a_layer_holding_two_layouts_runs_each_bucket_on_its_kernel_and_saves_an_ordinary_checkpoint(
    two_fake_kernels,
):
    model = tiny_llama()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    prompt, step = torch.randint(0, 128, (1, 512)), torch.randint(0, 128, (1, 1))
    with torch.no_grad():
        expected = model(input_ids=prompt).logits, model(input_ids=step).logits
    report = swap_to_semi_structured_(model, dense_fallback="copy", autotune=TwoKernelTimings(cache_path=False),
                                      eager_graphs=False)  # fmt: skip
    assert {r.status for r in report.two_four} == {"sparse+sparse"}
    assert report.two_four[0].plans == {8: "tile 2", 16: "tile 2", 32: "tile 2", 64: "tile 2", 512: "tile 7"}
    layers = [m for m in model.modules() if isinstance(m, MultiLayoutLinear)]
    assert len(layers) == 5  # q/k/v fused, o_proj, gate, up, down
    for layer in layers:
        assert layer.layer_for(1).kernel == "decode-tile" and layer.layer_for(512).kernel == "tile"
        assert layer.layer_for(4096).kernel == "tile"  # a bucket not tuned runs what the nearest one runs
    with torch.no_grad():
        assert torch.allclose(model(input_ids=prompt).logits, expected[0], atol=1e-5)
        assert torch.allclose(model(input_ids=step).logits, expected[1], atol=1e-5)
    state = model.state_dict()
    assert list(state) == list(dense_state) and all(torch.equal(state[k], dense_state[k]) for k in state)
    model.load_state_dict(dense_state)  # every layout recompressed from the dense weights
    assert len(restore_dense_(model)) == 7
    assert not any(isinstance(m, MultiLayoutLinear) for m in model.modules())
    assert all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items())


def test_a_weight_one_layout_fails_to_take_leaves_every_layout_as_it_was(two_fake_kernels):
    model = tiny_llama()
    swap_to_semi_structured_(model, dense_fallback="copy", autotune=TwoKernelTimings(cache_path=False),
                             eager_graphs=False)  # fmt: skip
    layer = next(m for m in model.modules() if isinstance(m, MultiLayoutLinear) and m.emits_state)
    before = layer.weight.clone()
    first, second = layer.layouts.values()
    new = before.flip(0).contiguous()  # 2:4 still, and another weight

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    second.set_weight_ = fail  # the second layout fails after the first took the new weight
    with pytest.raises(RuntimeError, match="illegal memory access"):
        layer.set_weight_(new)
    assert torch.equal(first.weight, before) and torch.equal(layer.weight, before)
    del second.set_weight_
    layer.set_weight_(new)  # with nothing failing, every layout takes it
    assert all(torch.equal(layout.weight, new) for layout in layer.layouts.values())
