"""`SparsityCallback` on generative models: a tiny Llama under `trl.SFTTrainer` (packing, gradient checkpointing,
bf16 autocast on the CPU) and a plain causal-LM `Trainer`, and tiny T5 and Bart under a seq2seq `Trainer`. After
training every projection is exactly 2:4, embeddings and heads are not pruned, and both checkpoints reload with
identical logits."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

import hf_sparse
from hf_sparse import SparsityCallback
from hf_sparse.lm import byte_tokenizer
from hf_sparse.masks import is_nm
from tests.test_lm_evaluation import tiny_llama

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# transformers 5.25 renamed gradient_checkpointing (the old name warns)
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)
TEXTS = [f"Paris has {i} bridges and {2 * i} museums." for i in range(48)]


def _common_args(tmp_path, **overrides) -> dict:
    args = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    args.update(overrides)
    return args


def _zeros(model, names) -> dict[str, int]:
    """Exact zeros in each named module's weight (a padding embedding holds one row of them from the start)."""
    return {n: int((model.get_submodule(n).weight == 0).sum()) for n in names}


def _not_pruned(model, zeros: dict[str, int]) -> bool:
    """No more zeros than before training (the padding row may train away from zero where the head is tied)."""
    return all(n <= zeros[name] for name, n in _zeros(model, list(zeros)).items())


def _check_reloads(model, tmp_path, loader, inputs: dict) -> None:
    """The standard checkpoint reloads with plain `from_pretrained`, the compact one once hf_sparse is imported
    (it is: this module imports it), both with the trained model's logits exactly."""
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "standard")
    hf_sparse.save_pretrained(model, tmp_path / "compact", compact=True)
    for folder in ("standard", "compact"):
        loaded = loader.from_pretrained(tmp_path / folder).eval()
        assert type(loaded) is type(model)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, expected), folder
        if model.config.tie_word_embeddings:
            assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight, folder


def _check_llama(model, sparsity: SparsityCallback, tmp_path, zeros: dict[str, int]) -> None:
    expected = {f"model.layers.{b}.{part}.{p}" for b in range(2) for part, p in
                [("self_attn", p) for p in LLAMA_PROJECTIONS[:4]] + [("mlp", p) for p in LLAMA_PROJECTIONS[4:]]}  # fmt: skip
    assert set(sparsity.layers) == expected
    assert all(is_nm(model.get_submodule(n).weight) for n in expected)
    assert _not_pruned(model, zeros)  # embeddings and LM head
    assert not is_nm(model.lm_head.weight) and not is_nm(model.model.embed_tokens.weight)
    _check_reloads(model, tmp_path, AutoModelForCausalLM, {"input_ids": torch.randint(0, 256, (2, 20))})


def _bf16_on_cpu_problem() -> str | None:
    try:
        TrainingArguments(output_dir="unused", bf16=True, use_cpu=True, report_to="none")
    except (ValueError, ImportError) as err:
        return f"this transformers/torch refuse bf16=True with use_cpu=True: {err}"
    return None


@pytest.mark.parametrize(
    "tied,extra",
    [
        (False, {"bf16": False}),  # trl's SFTConfig turns bf16 (and gradient checkpointing) on by default
        pytest.param(
            True,
            {"bf16": True},
            marks=pytest.mark.skipif(_bf16_on_cpu_problem() is not None, reason=_bf16_on_cpu_problem() or ""),
        ),
    ],
    ids=["untied-fp32", "tied-bf16-autocast"],
)
def test_sft_trainer_with_packing_leaves_every_projection_2_4(tmp_path, tied, extra):
    trl = pytest.importorskip("trl", reason="install the test extra: pip install -e '.[test]'")
    from datasets import Dataset

    tokenizer = byte_tokenizer()
    model = tiny_llama(tokenizer, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    zeros = _zeros(model, ["model.embed_tokens", "lm_head"])
    config = trl.SFTConfig(**_common_args(tmp_path, **extra, **{CHECKPOINTING: True}), max_length=128, packing=True)
    sparsity = SparsityCallback()
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        callbacks=[sparsity],
    )
    batch = next(iter(trainer.get_train_dataloader()))
    starts = int((batch["position_ids"] == 0).sum())
    assert starts > config.per_device_train_batch_size  # packed: several texts to each example of 128 tokens
    trainer.train()
    assert trainer.state.global_step == 4
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert trainer.accelerator.mixed_precision == ("bf16" if extra["bf16"] else "no")
    # accelerate left the bf16 autocast wrapper on the model's forward: compare the weights' own fp32 logits
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _check_llama(model, sparsity, tmp_path, zeros)


def test_a_plain_causal_lm_trainer_leaves_every_projection_2_4(tmp_path):
    from datasets import Dataset

    tokenizer = byte_tokenizer()
    model = tiny_llama(tokenizer, tie_word_embeddings=True)
    zeros = _zeros(model, ["model.embed_tokens", "lm_head"])
    train = Dataset.from_dict(dict(tokenizer(TEXTS)))
    sparsity = SparsityCallback()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_common_args(tmp_path, **{CHECKPOINTING: True})),
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[sparsity],
    )
    trainer.train()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    _check_llama(model, sparsity, tmp_path, zeros)


def _t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)  # fmt: skip
    return T5ForConditionalGeneration(config), ["q", "k", "v", "o", "wi", "wo"], ["shared"]


def _bart(tokenizer):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=len(tokenizer), d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=None)  # fmt: skip
    return (
        BartForConditionalGeneration(config),
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        ["model.shared"],
    )


@pytest.mark.parametrize("build", [_t5, _bart], ids=["t5", "bart"])
def test_a_seq2seq_trainer_leaves_every_encoder_and_decoder_projection_2_4(tmp_path, build):
    from datasets import Dataset

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model, kinds, embeddings = build(tokenizer)
    zeros = _zeros(model, [*embeddings, "lm_head"])
    rows = {"input_ids": tokenizer(TEXTS).input_ids, "labels": tokenizer([t[-30:] for t in TEXTS]).input_ids}
    sparsity = SparsityCallback()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_common_args(tmp_path)),
        train_dataset=Dataset.from_dict(rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        callbacks=[sparsity],
    )
    trainer.train()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    projections = {n for n in linears if n.rsplit(".", 1)[-1] in kinds}
    # both stacks, self- and cross-attention and the feed-forward layers: every nn.Linear but the LM head
    assert set(sparsity.layers) == projections == linears - {"lm_head"}
    assert any(".decoder." in n or n.startswith("decoder.") for n in projections)
    assert all(is_nm(model.get_submodule(n).weight) for n in projections)
    assert _not_pruned(model, zeros)
    inputs = {"input_ids": torch.randint(0, 256, (2, 20)), "decoder_input_ids": torch.randint(0, 256, (2, 7))}
    _check_reloads(model, tmp_path, AutoModelForSeq2SeqLM, inputs)


def test_distillation_under_sft_trainer_with_packing_pulls_the_pruned_student_to_its_teacher(tmp_path):
    trl = pytest.importorskip("trl", reason="install the test extra: pip install -e '.[test]'")
    import copy

    from datasets import Dataset

    from hf_sparse import DistillationLoss

    class DistillingSFTTrainer(trl.SFTTrainer):  # the README's way: trl 1.16 deprecates compute_loss_func here
        def __init__(self, *args, distillation, **kwargs):
            super().__init__(*args, **kwargs)
            self.distillation = distillation

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = self.distillation(outputs, inputs["labels"], num_items_in_batch=num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    tokenizer = byte_tokenizer()
    model = tiny_llama(tokenizer, initializer_range=0.2)
    teacher = copy.deepcopy(model)
    config = trl.SFTConfig(**_common_args(tmp_path, max_steps=20, logging_steps=5, learning_rate=3e-3, bf16=False),
                           max_length=128, packing=True)  # fmt: skip
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    trainer = DistillingSFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        callbacks=[SparsityCallback()],
        distillation=DistillationLoss(teacher, model, temperature=1.0),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(is_nm(model.get_submodule(f"model.layers.{b}.mlp.down_proj").weight) for b in range(2))
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(forwards) == 20 * config.gradient_accumulation_steps  # the student runs once per step
