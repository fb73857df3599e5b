"""Distillation from the dense teacher through `Trainer(compute_loss_func=...)`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForQuestionAnswering, BertModel, Trainer, TrainingArguments

from hf_sparse import DistillationLoss, SparsityCallback, prune_, sparsity_report
from tests.conftest import RandomQADataset, tiny_bert_config


def _held_out(seed: int = 1000, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (size, 32), generator=g)}


@torch.no_grad()
def _gap(student, teacher, inputs) -> float:
    """KL(teacher || student) of the start and end distributions on held-out inputs."""
    s, t = student.eval()(**inputs), teacher.eval()(**inputs)
    return sum(
        F.kl_div(F.log_softmax(s[k], -1), F.log_softmax(t[k], -1), log_target=True, reduction="batchmean").item()
        for k in ("start_logits", "end_logits")
    )


def test_distillation_reduces_the_gap_to_the_dense_teacher(tmp_path):
    torch.manual_seed(0)
    # Larger initial weights give sharp start/end distributions that pruning visibly changes; no dropout keeps the
    # student's training signal clean in a few steps.
    config = tiny_bert_config(initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForQuestionAnswering(config)
    teacher = copy.deepcopy(model)
    held_out = _held_out()
    one_shot = copy.deepcopy(model)
    prune_(one_shot)
    before = _gap(one_shot, teacher, held_out)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=40,
        learning_rate=3e-3,
        warmup_steps=0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    loss = DistillationLoss(teacher, model, temperature=1.0)
    sparsity = SparsityCallback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomQADataset(size=640),
        callbacks=[sparsity],
        compute_loss_func=loss,
    )
    trainer.train()
    after = _gap(model, teacher, held_out)
    assert all(r.is_nm for r in sparsity_report(model, layers=list(sparsity.layers)))
    assert after < 0.7 * before, (before, after)  # measured: 1.61 -> 0.89  # measured: 0.349 -> 0.188
    # The teacher is still the dense model: untouched by pruning and training.
    assert not any(r.is_nm for r in sparsity_report(teacher, layers=["bert.encoder.layer.0.output.dense"]))


def test_loss_is_zero_for_an_identical_student_and_matches_the_kl_by_hand():
    torch.manual_seed(0)
    student = BertForQuestionAnswering(tiny_bert_config()).eval()
    teacher = copy.deepcopy(student)
    inputs = _held_out(size=4)
    loss = DistillationLoss(teacher, student, temperature=2.0)
    assert loss(student(**inputs)).item() == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():
        student.qa_outputs.weight.mul_(3.0)
    outputs = student(**inputs)
    with torch.no_grad():
        reference = teacher(**inputs)
    expected = 0.0
    for k in ("start_logits", "end_logits"):
        log_t = F.log_softmax(reference[k] / 2.0, -1)
        log_s = F.log_softmax(outputs[k] / 2.0, -1)
        expected += (log_t.exp() * (log_t - log_s)).sum(-1).mean() * 4.0 / 2
    assert loss(outputs).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.__class__(teacher, student, gradient_accumulation_steps=4)(student(**inputs)).item() == pytest.approx(
        expected.item() / 4, rel=1e-5
    )


def _base_student_and_teacher(layer: int = 0):
    """A tiny base BERT (the student) and its copy (the teacher), the student's layer `layer` perturbed."""
    torch.manual_seed(0)
    student = BertModel(tiny_bert_config(), add_pooling_layer=False).eval()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        student.encoder.layer[layer].output.dense.weight.mul_(0.5)
    return student, teacher


def test_hidden_state_distillation_ignores_padding():
    student, teacher = _base_student_and_teacher(1)
    loss = DistillationLoss(teacher, student, logits_weight=0.0, hidden_weight=1.0, hidden_loss="cosine")
    input_ids = torch.randint(1, 128, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    outputs = student(input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        target = teacher(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    per_token = 1 - F.cosine_similarity(outputs.last_hidden_state, target, dim=-1)
    expected = per_token[attention_mask.bool()].mean()
    assert loss(outputs).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss(student(input_ids=input_ids, attention_mask=attention_mask)).requires_grad


def test_bad_uses_are_named():
    model = BertModel(tiny_bert_config())
    with pytest.raises(ValueError, match="same module"):
        DistillationLoss(model, model)
    with pytest.raises(ValueError, match="hidden_loss must be one of"):
        DistillationLoss(copy.deepcopy(model), model, hidden_loss="l1")
    with pytest.raises(ValueError, match="hidden_layers='mean_pooled'"):
        DistillationLoss(copy.deepcopy(model), model, hidden_loss="similarity", hidden_layers="last")
    loss = DistillationLoss(copy.deepcopy(model), model)
    with pytest.raises(RuntimeError, match="before the student ran"):
        loss({"logits": torch.zeros(1, 2)})
    outputs = model(input_ids=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no logits"):
        loss(outputs)


def test_mean_pooled_distillation_compares_sentence_embeddings():
    student, teacher = _base_student_and_teacher()
    loss = DistillationLoss(teacher, student, logits_weight=0.0, hidden_weight=1.0, hidden_layers="mean_pooled")
    input_ids = torch.randint(1, 128, (2, 5))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    outputs = student(input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        target = teacher(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pooled(hidden):
        return torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])

    expected = (pooled(outputs.last_hidden_state) - pooled(target)).pow(2).mean()
    assert loss(outputs).item() == pytest.approx(expected.item(), rel=1e-5)


def test_similarity_distillation_adds_the_in_batch_similarity_gap():
    student, teacher = _base_student_and_teacher()
    kwargs = dict(logits_weight=0.0, hidden_weight=1.0, hidden_layers="mean_pooled")
    cosine = DistillationLoss(teacher, student, hidden_loss="cosine", **kwargs)
    input_ids = torch.randint(1, 128, (3, 6))
    outputs = student(input_ids=input_ids)
    cosine_value = cosine(outputs)
    cosine.remove()
    similarity = DistillationLoss(teacher, student, hidden_loss="similarity", **kwargs)
    outputs = student(input_ids=input_ids)
    with torch.no_grad():
        t = torch.nn.functional.normalize(teacher(input_ids=input_ids).last_hidden_state.mean(1), dim=-1)
    s = torch.nn.functional.normalize(outputs.last_hidden_state.mean(1), dim=-1)
    gap = (s @ s.T - t @ t.T).pow(2).mean()
    assert gap.item() > 0
    assert similarity(outputs).item() == pytest.approx(cosine_value.item() + gap.item(), rel=1e-5)


def test_teacher_is_sharded_like_an_fsdp2_student_and_gives_the_replica_loss(tmp_path):
    from tests.conftest import torchrun_two_ranks

    for report in torchrun_two_ranks("distill_fsdp2.py", tmp_path):
        assert report["teacher_sharded"] and not report["replica_sharded"]
        assert (report["teacher_local_rows"], report["teacher_full_rows"]) == (32, 64)
        assert report["loss"] > 0 and report["loss"] == pytest.approx(report["replica_loss"], rel=1e-6)


def test_a_batch_of_distillation_only_inputs_has_no_task_term_instead_of_nan():
    torch.manual_seed(0)
    student = BertForQuestionAnswering(tiny_bert_config()).eval()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        student.qa_outputs.weight.mul_(3.0)
    inputs = _held_out(size=4)
    seq = inputs["input_ids"].shape[1]
    ignored = torch.full((4,), seq)  # hf_sparse.squad.distillation_features' answer positions
    distill_only = DistillationLoss(teacher, student)(student(**inputs))
    loss = DistillationLoss(teacher, student, task_weight=1.0)  # (each reads the inputs of the student's last call)
    outputs = student(**inputs, start_positions=ignored, end_positions=ignored)
    assert torch.isnan(outputs.loss)  # what the QA head gives when it ignores every row
    assert loss(outputs).item() == pytest.approx(distill_only.item(), rel=1e-6)
    mixed = torch.tensor([3, seq, 5, seq])  # labelled rows keep their task term
    outputs = student(**inputs, start_positions=mixed, end_positions=mixed)
    assert torch.isfinite(outputs.loss) and loss(outputs).item() > distill_only.item()


# -- causal LMs and encoder-decoders -----------------------------------------------------------------------------------


def _llama_pair(initializer_range: float = 0.02):
    """A tiny Llama (the student, its MLPs perturbed) and its dense copy (the teacher)."""
    from tests.test_lm_evaluation import tiny_llama

    student = tiny_llama(initializer_range=initializer_range)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for layer in student.model.layers:
            layer.mlp.down_proj.weight.mul_(2.0)
    return student, teacher


def _lm_batch():
    """Two right-padded rows: the first with a three-token prompt (labels -100), the second padded after 5 tokens."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (2, 9), generator=g)
    attention_mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, 5:] = -100
    return input_ids, attention_mask, labels


def _next_token_kl(s_logits, t_logits, temperature):
    log_s, log_t = F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2


def test_causal_lm_kl_counts_the_positions_that_predict_a_labelled_token():
    student, teacher = _llama_pair(initializer_range=0.2)
    input_ids, attention_mask, labels = _lm_batch()
    loss = DistillationLoss(copy.deepcopy(student), student, temperature=2.0)
    assert loss(student(input_ids=input_ids, attention_mask=attention_mask), labels).item() == pytest.approx(
        0, abs=1e-7
    )
    loss.remove()

    loss = DistillationLoss(teacher, student, temperature=2.0)
    outputs = student(input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        reference = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    per_position = _next_token_kl(outputs.logits, reference, 2.0)
    # position p predicts token p + 1: row 0 counts positions 2..7 (tokens 3..8), row 1 positions 0..3 (tokens 1..4)
    counted = torch.cat([per_position[0, 2:8], per_position[1, 0:4]])
    value = loss(outputs, labels)
    assert value.item() > 0 and value.item() == pytest.approx(counted.mean().item(), rel=1e-5)
    # with the Trainer's count of labelled tokens, the KL is summed and divided by it (as the LM loss is), so that
    # each row alone, unpadded, adds up to the batch: padding and prompt tokens count nowhere
    total = loss(student(input_ids=input_ids, attention_mask=attention_mask), labels, num_items_in_batch=20)
    rows = [
        loss(student(input_ids=input_ids[:1]), labels[:1], num_items_in_batch=20),
        loss(student(input_ids=input_ids[1:, :5]), labels[1:, :5], num_items_in_batch=20),
    ]
    assert total.item() == pytest.approx(counted.sum().item() / 20, rel=1e-5)
    assert total.item() == pytest.approx(sum(r.item() for r in rows), rel=1e-5)


def test_normalized_mse_divides_each_layer_by_the_teacher_variance():
    student, teacher = _llama_pair()
    input_ids, attention_mask, labels = _lm_batch()
    loss = DistillationLoss(
        teacher, student, logits_weight=0.0, hidden_weight=1.0, hidden_loss="normalized_mse", hidden_layers="all"
    )
    outputs = student(input_ids=input_ids, attention_mask=attention_mask)
    assert len(outputs.hidden_states) == 3  # the embeddings and two blocks: the hook asked for them
    with torch.no_grad():
        reference = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    counted = torch.zeros(2, 9, dtype=torch.bool)
    counted[0, 2:8], counted[1, 0:4] = True, True
    expected = sum(
        (s[counted] - t[counted]).pow(2).mean() / t[counted].var(unbiased=False)
        for s, t in zip(outputs.hidden_states, reference.hidden_states)
    ) / len(outputs.hidden_states)
    assert expected.item() > 0 and loss(outputs, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_task_term_of_gpt2_is_the_shifted_language_model_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    loss = DistillationLoss(copy.deepcopy(model), model, logits_weight=0.0, task_weight=1.0)
    input_ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids).loss
    # GPT2LMHeadModel's name does not end in ForCausalLM: the labels must still be shifted
    assert loss(model(input_ids=input_ids), input_ids).item() == pytest.approx(expected.item(), rel=1e-5)


def test_encoder_decoder_kl_counts_only_labelled_decoder_positions():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    student = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0)
    ).eval()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        student.lm_head.weight.mul_(3.0)
    loss = DistillationLoss(teacher, student)
    input_ids = torch.randint(1, 64, (2, 7))
    labels = torch.randint(1, 64, (2, 5))
    labels[1, 2:] = -100  # the second target is two tokens long
    decoder_input_ids = student._shift_right(labels)
    outputs = student(input_ids=input_ids, decoder_input_ids=decoder_input_ids)
    with torch.no_grad():
        reference = teacher(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    per_position = _next_token_kl(outputs.logits, reference, 2.0)
    assert loss(outputs, labels).item() == pytest.approx(per_position[labels != -100].mean().item(), rel=1e-5)


def test_teacher_generations_are_reproducible_and_label_only_what_the_teacher_wrote():
    from hf_sparse.lm import byte_tokenizer, teacher_generations
    from tests.test_lm_evaluation import tiny_llama

    tokenizer, model = byte_tokenizer(), tiny_llama()
    prompts = ["Tell me about Paris.", "Hi", "What runs through Paris?"]
    model.train()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    data = teacher_generations(model, tokenizer, prompts, max_new_tokens=12, seed=5, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training  # the caller's state is kept
    assert teacher_generations(model, tokenizer, prompts, max_new_tokens=12, seed=5, batch_size=2)[:] == data[:]
    assert teacher_generations(model, tokenizer, prompts, max_new_tokens=12, seed=6)["input_ids"] != data["input_ids"]
    eos = tokenizer.eos_token_id
    for prompt, row in zip(prompts, data):
        prompt_ids = tokenizer(prompt).input_ids
        written = row["input_ids"][len(prompt_ids) :]
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        assert row["labels"] == [-100] * len(prompt_ids) + written
        assert 1 <= len(written) <= 12 and eos not in written[:-1]  # up to and including the end of sequence
        assert len(written) == 12 or written[-1] == eos
    with pytest.raises(ValueError, match="temperature > 0"):
        teacher_generations(model, tokenizer, prompts, temperature=0.0)
    chat = teacher_generations(model, tokenizer, prompts[:1], max_new_tokens=4, chat_template=True)
    assert tokenizer.decode(chat[0]["input_ids"]).startswith("<|im_start|>user\nTell me about Paris.<|im_end|>")


def test_a_pruned_tiny_llama_recovers_by_distillation_on_text_its_teacher_wrote(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    from hf_sparse.lm import byte_tokenizer, teacher_generations
    from tests.test_lm_evaluation import tiny_llama

    tokenizer = byte_tokenizer()
    # Larger initial weights give sharp next-token distributions that pruning visibly changes
    model = tiny_llama(tokenizer, initializer_range=0.2)
    teacher = copy.deepcopy(model)
    prompts = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(48)]
    train = teacher_generations(teacher, tokenizer, prompts[:40], max_new_tokens=24, seed=0)
    held_out = teacher_generations(teacher, tokenizer, prompts[40:], max_new_tokens=24, seed=1)
    collator = DataCollatorForSeq2Seq(tokenizer)
    batch = collator([dict(r) for r in held_out])

    @torch.no_grad()
    def gap(student) -> float:
        loss = DistillationLoss(teacher, student, temperature=1.0)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        value = loss(student.eval()(**inputs), batch["labels"]).item()
        loss.remove()
        return value

    one_shot = copy.deepcopy(model)
    prune_(one_shot)
    before = gap(one_shot)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=60,
        learning_rate=3e-3,
        warmup_steps=0,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    loss = DistillationLoss(teacher, model, temperature=1.0, hidden_weight=1.0, hidden_loss="normalized_mse",
                            hidden_layers="all")  # fmt: skip
    sparsity = SparsityCallback()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[sparsity],
                      compute_loss_func=loss)  # fmt: skip
    trainer.train()
    after = gap(model)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(sparsity.layers) == 14 and all(r.is_nm for r in sparsity_report(model, layers=list(sparsity.layers)))
    assert losses[-1] < 0.5 * losses[0], losses  # measured: 1.76 -> 0.63
    assert after < 0.7 * before, (before, after)  # measured: 1.61 -> 0.89
