"""Calibration linear in depth: blocks run on stored inputs give the masks of running the model again for each block,
each block runs a fixed number of times whatever its depth, and stacks that do not allow it fall back, saying why."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertForQuestionAnswering,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_sparse import SparsityConfig, select_layers
from hf_sparse.criteria import compute_masks
from tests.conftest import tiny_bert_config

LLM = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64,
)  # fmt: skip


def tiny_llama(blocks: int = 4, **overrides) -> LlamaForCausalLM:
    """A Llama with grouped-query attention (4 query heads, 2 key/value heads), seeded."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**LLM, "num_hidden_layers": blocks, **overrides}))


def calibration_data(sequences: int = 8, length: int = 24, batch: int = 4, seed: int = 0) -> list[dict]:
    """Batches of token ids with right padding in some rows (the statistics must leave it out)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (sequences, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1::3, length - 7 :] = 0
    return [
        {"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch]} for i in range(0, sequences, batch)
    ]


def _models():
    seq2seq = dict(vocab_size=128, max_position_embeddings=64)
    return {
        "bert": lambda: BertForQuestionAnswering(tiny_bert_config(num_hidden_layers=3)),
        "llama": lambda: tiny_llama(),
        # layers of two kinds (sliding-window and full attention): each kind gets its own attention mask
        "qwen2-sliding": lambda: Qwen2ForCausalLM(
            Qwen2Config(**LLM, num_hidden_layers=4, use_sliding_window=True, sliding_window=6, max_window_layers=2)
        ),
        "gemma3": lambda: Gemma3ForCausalLM(
            Gemma3TextConfig(**LLM, num_hidden_layers=4, head_dim=16, sliding_window=6, sliding_window_pattern=2)
        ),
        "t5": lambda: T5ForConditionalGeneration(
            T5Config(
                vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4, decoder_start_token_id=0
            )
        ),
        "bart": lambda: BartForConditionalGeneration(
            BartConfig(
                **seq2seq,
                d_model=64,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
            )
        ),  # fmt: skip
    }


def _prune(model, config, data, block_inputs):
    masks = compute_masks(model, select_layers(model, config).targets, config, data, block_inputs=block_inputs)
    return masks, {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("options", [{"criterion": "wanda"}, {"criterion": "sparsegpt", "sequential_calibration": True,
                                                               "sparsegpt_update_bias": True}], ids=["wanda", "sparsegpt"])  # fmt: skip
@pytest.mark.parametrize("kind", list(_models()))
def test_blocks_on_stored_inputs_give_the_masks_and_weights_of_running_the_model_again(kind, options, caplog):
    torch.manual_seed(0)
    dense = _models()[kind]()
    data = calibration_data()
    if dense.config.is_encoder_decoder:  # the decoder calibrates on the targets, 12 tokens with their own padding
        data = [dict(batch, labels=batch["input_ids"][:, :12].masked_fill(batch["input_ids"][:, :12] < 10, -100))
                for batch in data]  # fmt: skip
    config = SparsityConfig(**options, calibration_samples=8)
    again, again_state = _prune(copy.deepcopy(dense), config, data, block_inputs="none")
    with caplog.at_level(logging.INFO, logger="hf_sparse.calibration"):
        stored, stored_state = _prune(copy.deepcopy(dense), config, data, block_inputs="auto")
    assert "cannot run its blocks on stored inputs" not in caplog.text
    stacks = 2 if dense.config.is_encoder_decoder else 1
    assert caplog.text.count("on stored inputs") == stacks, caplog.text
    assert sorted(stored) == sorted(again)
    assert [name for name in stored if not torch.equal(stored[name], again[name])] == []
    # bit for bit: the same operations on the same inputs (SparseGPT's updated weights and biases included)
    assert [name for name in stored_state if not torch.equal(stored_state[name], again_state[name])] == []


def _forward_counts(model: nn.Module, blocks: nn.ModuleList) -> list[int]:
    counts = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda *args, index=index: counts.__setitem__(index, counts[index] + 1))
    return counts


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_each_block_runs_a_number_of_times_independent_of_its_depth(criterion):
    config = SparsityConfig(criterion=criterion, calibration_samples=8)
    data = calibration_data()  # 2 batches
    for depth in (4, 8):
        stored, again = tiny_llama(depth), tiny_llama(depth)
        counts = _forward_counts(stored, stored.model.layers)
        compute_masks(stored, select_layers(stored, config).targets, config, data)
        # per batch: once as the model runs up to the last block to record their inputs, once for the statistics,
        # once pruned for the outputs that are the next block's inputs; the last block only for its statistics
        assert counts == [2 * 3] * (depth - 1) + [2 * 1], (depth, counts)
        # Running the model again for each block: block j runs for every block from j on (k(k+1)/2 in all)
        counts = _forward_counts(again, again.model.layers)
        compute_masks(again, select_layers(again, config).targets, config, data, block_inputs="none")
        assert counts == [2 * (depth - j) for j in range(depth)]


def test_an_encoder_decoder_runs_its_encoder_once_more_for_its_decoder():
    model = _models()["bart"]()
    config = SparsityConfig(criterion="wanda", calibration_samples=8)
    data = [dict(batch, labels=batch["input_ids"][:, :12]) for batch in calibration_data()]
    encoder = _forward_counts(model, model.model.encoder.layers)
    decoder = _forward_counts(model, model.model.decoder.layers)
    compute_masks(model, select_layers(model, config).targets, config, data)
    assert encoder == [2 * 4, 2 * 2]  # its own calibration (3, then 1), and the capture of the decoder's inputs
    assert decoder == [2 * 3, 2 * 1]


class Block(nn.Module):
    def __init__(self, width: int = 8, in_place: bool = False):
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)
        self.in_place = in_place

    def forward(self, x, skip=None):
        y = torch.relu(self.fc(x)) + (0 if skip is None else skip)
        if self.in_place:
            x.mul_(0.5)
        return y


class Unusual(nn.Module):
    """Blocks in an nn.ModuleList, chained in a way that stored inputs cannot reproduce."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.layers = nn.ModuleList(Block(in_place=how == "in place") for _ in range(4))

    def forward(self, x):
        x = x + 0  # the blocks that change their inputs in place must not change the calibration data
        if self.how == "reversed":
            for block in reversed(self.layers):
                x = block(x)
            return x
        before = x
        for block in self.layers:
            if self.how == "skip":  # each block also gets the input of the block before it
                x, before = block(x, skip=before), x
            elif self.how == "scaled":  # the model changes the hidden states between blocks
                x = 2 * block(x)
            else:
                x = block(x)
        return x


@pytest.mark.parametrize(
    "how, reason",
    [
        ("reversed", "layers.3 ran when layers.0 was expected (blocks out of order or reused)"),
        (
            "skip",
            "layers.2 takes 'skip', a tensor of the hidden states' shape that the block before it did not return",
        ),
        ("scaled", "layers.1 does not take the hidden states that the block before it returned"),
        ("in place", "layers.0 changes its inputs in place"),
    ],
)
def test_a_stack_that_stored_inputs_cannot_reproduce_falls_back_saying_why(how, reason, caplog):
    torch.manual_seed(0)
    dense = Unusual(how)
    data = [{"x": torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    config = SparsityConfig(criterion="sparsegpt")
    with caplog.at_level(logging.WARNING, logger="hf_sparse.calibration"):
        fallen_back, state = _prune(copy.deepcopy(dense), config, data, block_inputs="auto")
    assert f"hf-sparse: layers: calibration cannot run its blocks on stored inputs ({reason}" in caplog.text
    assert caplog.text.count("cannot run its blocks") == 1  # once for the stack
    again, again_state = _prune(copy.deepcopy(dense), config, data, block_inputs="none")
    assert all(torch.equal(fallen_back[name], again[name]) for name in again)
    assert all(torch.equal(state[name], again_state[name]) for name in again_state)


def test_a_bad_block_inputs_value_names_the_keyword_and_changes_nothing():
    model = tiny_llama(2)
    before = copy.deepcopy(model.state_dict())
    config = SparsityConfig(criterion="wanda")
    with pytest.raises(
        ValueError, match=r"block_inputs must be one of \('auto', 'device', 'cpu', 'none'\); got 'gpu'"
    ):
        compute_masks(model, select_layers(model, config).targets, config, calibration_data(), block_inputs="gpu")
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_fsdp2_row_shards_calibrated_on_stored_inputs_match_the_unsharded_model(tmp_path, criterion):
    from tests.conftest import torchrun_two_ranks

    for rank in torchrun_two_ranks("calibrate_fsdp2.py", tmp_path, criterion):
        for mode, stored in (("auto", True), ("none", False)):
            expected = {"local_rows": 64, "masks_equal_unsharded": True, "weights_equal_unsharded": True}
            assert rank[mode] == {**expected, "on_stored_inputs": stored}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (block inputs are offloaded from it)")
def test_on_a_gpu_offloaded_block_inputs_give_the_masks_of_inputs_kept_on_it(caplog):
    config = SparsityConfig(criterion="sparsegpt", calibration_samples=8)
    data = calibration_data()
    results = {}
    for mode in ("device", "cpu", "none"):
        model = tiny_llama().cuda()
        with caplog.at_level(logging.INFO, logger="hf_sparse.calibration"):
            results[mode] = compute_masks(model, select_layers(model, config).targets, config, data, block_inputs=mode)
    assert "offloaded to the CPU" in caplog.text
    for mode in ("cpu", "none"):
        assert all(torch.equal(results[mode][name], results["device"][name]) for name in results["device"]), mode


class CausalLMData(torch.utils.data.Dataset):
    """Token ids with themselves as labels, as a causal-LM collator makes them."""

    def __init__(self, size: int = 16, length: int = 16, seed: int = 0):
        self.ids = torch.randint(3, 128, (size, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")
@pytest.mark.parametrize(
    "setup",
    [
        {},  # grouped-query attention: 4 query heads share 2 key/value heads
        {"tie_word_embeddings": True},
        {"compile": True},
        {"gradient_checkpointing": True},
    ],
    ids=["gqa", "tied-embeddings", "torch-compile", "gradient-checkpointing"],
)
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_a_llama_under_the_trainer_calibrates_every_projection_and_trains_it_2_4(tmp_path, criterion, setup):
    from transformers import Trainer, TrainingArguments

    from hf_sparse import SparsityCallback, prune_
    from hf_sparse.calibration import calibration_sample
    from hf_sparse.masks import is_nm

    setup = dict(setup)
    compiled, checkpointing = setup.pop("compile", False), setup.pop("gradient_checkpointing", False)
    model = tiny_llama(2, **setup)
    initial = copy.deepcopy(model)
    train = CausalLMData()
    config = SparsityConfig(criterion=criterion, calibration_samples=8, calibration_batch_size=4)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, gradient_checkpointing=checkpointing,
        remove_unused_columns=not compiled,  # the Trainer reads a compiled wrapper's forward(*args, **kwargs)
    )  # fmt: skip
    trained = torch.compile(model, backend="eager") if compiled else model  # the wrapper matters, not the compiler
    Trainer(model=trained, args=args, train_dataset=train, callbacks=[SparsityCallback(config)]).train()

    # The masks are those of pruning the dense model on the same calibration examples, by hand
    by_hand = copy.deepcopy(initial)
    expected = prune_(by_hand, config, calibration_data=calibration_sample(train, config, seed=args.seed))
    names = [f"model.layers.{i}.{kind}_proj" for i in range(2) for kind in ("self_attn.q", "self_attn.k",
             "self_attn.v", "self_attn.o", "mlp.gate", "mlp.up", "mlp.down")]  # fmt: skip
    assert sorted(expected) == sorted(names)
    for name in names:  # trained, and still exactly 2:4 on the masks chosen at the start
        weight = model.get_submodule(name).weight
        assert is_nm(weight) and torch.equal(weight != 0, expected[name]), name
        assert not torch.equal(weight, by_hand.get_submodule(name).weight), name
    # Embeddings and the output head (the same tensor when tied) were trained, never pruned
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is setup.get("tie_word_embeddings", False)
    for name in ("model.embed_tokens", "lm_head"):
        weight = model.get_submodule(name).weight
        assert (weight != 0).all() and not torch.equal(weight, initial.get_submodule(name).weight), name
