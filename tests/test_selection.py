import pytest
import torch
from torch import nn

from hf_sparse import SparsityConfig, select_layers
from hf_sparse.selection import block_of


def test_default_selects_every_linear_of_the_blocks_and_no_head(tiny_qa_model):
    selection = select_layers(tiny_qa_model, SparsityConfig())
    assert len(selection.targets) == 2 * 6  # q, k, v, attn out, intermediate, output per layer
    assert all(name.startswith("bert.encoder.layer.") for name in selection.targets)
    assert "qa_outputs" not in selection.targets
    assert selection.skipped == {}


def test_default_never_selects_lm_heads_or_poolers():
    from transformers import BertForMaskedLM, BertForSequenceClassification

    from tests.conftest import tiny_bert_config

    for model in (BertForMaskedLM(tiny_bert_config()), BertForSequenceClassification(tiny_bert_config())):
        names = set(select_layers(model, SparsityConfig()).targets)
        assert names and all(".encoder.layer." in name for name in names)


def test_names_regexes_and_exclusions(tiny_qa_model):
    names = set(select_layers(tiny_qa_model, SparsityConfig(target_modules=["query", "key"])).targets)
    assert names == {f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key")}
    config = SparsityConfig(target_modules=[r".*\.layer\.1\..*"], exclude_modules=["intermediate.dense"])
    names = set(select_layers(tiny_qa_model, config).targets)
    assert "bert.encoder.layer.1.attention.self.query" in names
    assert "bert.encoder.layer.1.intermediate.dense" not in names
    assert not any(".layer.0." in name for name in names)
    # Heads can be pruned when asked for explicitly.
    assert set(select_layers(tiny_qa_model, SparsityConfig(target_modules=["qa_outputs"])).targets) == {"qa_outputs"}


def test_unprunable_matches_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 8), nn.LayerNorm(8))
    selection = select_layers(model, SparsityConfig(target_modules=[r"\d"]))
    assert set(selection.targets) == {"0", "1"}
    assert selection.skipped == {"2": "in_features=6 is not divisible by M=4", "3": "LayerNorm is not an nn.Linear"}
    assert "2  in_features=6 is not divisible by M=4" in selection.format_skipped()


def test_no_match_raises_naming_patterns_and_existing_modules(tiny_qa_model):
    with pytest.raises(ValueError) as err:
        select_layers(tiny_qa_model, SparsityConfig(target_modules=["q_proj", "v_proj"]))
    message = str(err.value)
    assert "target_modules=['q_proj', 'v_proj'] matched no module in BertForQuestionAnswering" in message
    assert "bert.encoder.layer.0.attention.self.query" in message
    with pytest.raises(ValueError, match="matched only modules that cannot be pruned"):
        select_layers(nn.Sequential(nn.Linear(6, 4)), SparsityConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="the default selection .* matched no module in Sequential"):
        select_layers(nn.Sequential(nn.Linear(8, 4)), SparsityConfig())


def test_selection_does_not_change_the_model(tiny_qa_model):
    before = {k: v.clone() for k, v in tiny_qa_model.state_dict().items()}
    select_layers(tiny_qa_model, SparsityConfig())
    assert all(torch.equal(before[k], v) for k, v in tiny_qa_model.state_dict().items())


LLM = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _decoder_llms():
    import transformers as t

    return {
        "llama": (lambda: t.LlamaForCausalLM(t.LlamaConfig(**LLM)), ATTENTION + MLP),
        "mistral": (lambda: t.MistralForCausalLM(t.MistralConfig(**LLM)), ATTENTION + MLP),
        "qwen2": (lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**LLM)), ATTENTION + MLP),
        "qwen3": (lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**LLM, head_dim=16)), ATTENTION + MLP),
        "gemma": (lambda: t.GemmaForCausalLM(t.GemmaConfig(**LLM, head_dim=16)), ATTENTION + MLP),
        "gemma2": (lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**LLM, head_dim=16)), ATTENTION + MLP),
        "gemma3": (lambda: t.Gemma3ForCausalLM(t.Gemma3TextConfig(**LLM, head_dim=16)), ATTENTION + MLP),
        "phi3": (  # fused query/key/value and gate/up projections
            lambda: t.Phi3ForCausalLM(t.Phi3Config(**LLM, pad_token_id=0)),
            ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
        ),
        "phi": (
            lambda: t.PhiForCausalLM(t.PhiConfig(**LLM)),
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"],
        ),
        "gpt-neox": (
            lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**LLM)),
            ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
        ),
        "gpt-bigcode": (  # GPT-2's block and names, with nn.Linear layers
            lambda: t.GPTBigCodeForCausalLM(t.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
            ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        ),
        "mixtral": (  # experts are 3-D parameters and the router no nn.Linear in transformers 5: attention only
            lambda: t.MixtralForCausalLM(t.MixtralConfig(**LLM, num_local_experts=4)),
            ATTENTION,
        ),
        "qwen2-moe": (  # the shared expert's projections, not its gate (a router of one output)
            lambda: t.Qwen2MoeForCausalLM(
                t.Qwen2MoeConfig(**LLM, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64)
            ),
            ATTENTION + [f"mlp.shared_expert.{name}" for name in ("gate_proj", "up_proj", "down_proj")],
        ),
    }


@pytest.mark.parametrize("kind", list(_decoder_llms()))
def test_decoder_llms_select_their_attention_and_mlp_projections_only(kind):
    build, per_block = _decoder_llms()[kind]
    model = build()
    selection = select_layers(model, SparsityConfig())
    prefix = block_of(next(iter(selection.targets))).rsplit(".", 1)[0]  # model.layers, gpt_neox.layers, transformer.h
    expected = {f"{prefix}.{block}.{name}" for block in range(2) for name in per_block}
    assert set(selection.targets) == expected
    assert selection.skipped == {}
    never = (nn.Embedding, nn.LayerNorm)
    for name, module in model.named_modules():
        if isinstance(module, never) or "norm" in type(module).__name__.lower() or name == "lm_head":
            assert not any(target == name or target.startswith(name + ".") for target in selection.targets), name


def test_tied_and_untied_output_heads_are_never_selected():
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (True, False):
        model = LlamaForCausalLM(LlamaConfig(**LLM, tie_word_embeddings=tied))
        assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
        names = set(select_layers(model, SparsityConfig()).targets)
        assert len(names) == 14 and "lm_head" not in names and not any("embed" in name for name in names)


class MoE(nn.Module):
    """Routers as nn.Linear layers, as older transformers releases and custom models hold them."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4, bias=False)  # Mixtral, Qwen2-MoE, OLMoE
        self.shared_expert_gate = nn.Linear(16, 1, bias=False)  # Qwen2-MoE
        self.router = nn.ModuleDict({"layer": nn.Linear(16, 4)})  # DBRX, GraniteMoE
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.gate_proj = nn.Linear(16, 32)  # a projection named after a gate, not a router


def test_mixture_of_experts_routers_are_not_selected_by_default_but_can_be_named():
    model = nn.Module()
    model.layers = nn.ModuleList([MoE()])
    names = set(select_layers(model, SparsityConfig()).targets)
    assert names == {f"layers.0.experts.{i}" for i in range(4)} | {"layers.0.gate_proj"}
    named = select_layers(model, SparsityConfig(target_modules=["gate", "router.layer"]))
    assert set(named.targets) == {"layers.0.gate", "layers.0.router.layer"}


def test_gpt2_conv1d_layers_are_reported_as_not_prunable_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    reason = "Conv1D (GPT-2's linear layer) stores its weight transposed (in_features x out_features)"
    with pytest.raises(ValueError) as err:
        select_layers(model, SparsityConfig())
    message = str(err.value)
    assert (
        "the default selection (nn.Linear layers inside repeated transformer blocks) matched only modules that "
        "cannot be pruned in GPT2LMHeadModel" in message
    )
    assert "8 module(s) not pruned" in message and f"transformer.h.1.attn.c_attn  {reason}" in message
    with pytest.raises(ValueError, match="matched only modules that cannot be pruned"):
        select_layers(model, SparsityConfig(target_modules=["c_attn"]))
