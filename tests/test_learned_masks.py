"""Learned 2:4 masks (`hf_sparse.learn_masks`, MaskLLM-style): the patterns, the learner's exactness at its prior, a
real Trainer learning masks towards a teacher pruned by other masks, the model given back as it was, and the learned
masks held through a recovery by `SparsityCallback(SparsityConfig(criterion="learned"), masks=...)`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_sparse import DistillationLoss, SparsityCallback, SparsityConfig, learn_masks, select_layers
from hf_sparse.learned_masks import MaskLearner, MaskLearningConfig, patterns
from hf_sparse.masks import is_nm, nm_mask, nm_mask_from_scores
from hf_sparse.pruning import prune_


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # initializer_range 0.3: peaked next-token distributions, so that masks visibly change the outputs
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3)  # fmt: skip
    return LlamaForCausalLM(config)


def masked(model, masks):
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in select_layers(copied, SparsityConfig()).targets.items():
            layer.weight.mul_(masks[name])
    return copied


def args(tmp_path, steps, lr=0.3, **kwargs):
    return TrainingArguments(str(tmp_path), max_steps=steps, learning_rate=lr, per_device_train_batch_size=16,
                             lr_scheduler_type="constant", weight_decay=0.0, report_to=[], save_strategy="no",
                             logging_steps=10, use_cpu=True, disable_tqdm=True, **kwargs)  # fmt: skip


def token_data(rows=256, length=16, seed=0):
    ids = torch.randint(0, 64, (rows, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def agreement(masks, target) -> float:
    """The share of groups of four whose pattern is the target's."""
    same = sum(int((masks[n] == target[n]).reshape(-1, 4).all(-1).sum()) for n in target)
    return same / sum(target[n].numel() // 4 for n in target)


def test_the_patterns_are_every_way_to_keep_n_of_m_once():
    two_four = patterns(2, 4)
    assert two_four.shape == (6, 4) and torch.all(two_four.sum(-1) == 2)
    assert len({tuple(row.tolist()) for row in two_four}) == 6
    assert patterns(1, 4).shape == (4, 4) and patterns(4, 8).shape == (70, 8)


def test_the_learner_at_its_prior_runs_the_prior_masked_model_and_only_its_logits_learn():
    model = tiny_llama()
    layers = select_layers(model, SparsityConfig()).targets
    prior = {name: nm_mask(layer.weight) for name, layer in layers.items()}
    learner = MaskLearner(model, layers, prior)
    ids = torch.randint(0, 64, (2, 8))
    learner.eval()
    with torch.no_grad():
        assert torch.equal(learner(input_ids=ids).logits, masked(model, prior)(input_ids=ids).logits)
    assert all(torch.equal(learner.hard_masks()[n], prior[n]) for n in prior)
    for p in model.parameters():
        p.requires_grad_(False)
    learner.train()
    learner(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.logits.values())
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == [f"logits.{k}" for k in learner.logits]
    assert not any(hasattr(m, "_forward_pre_hooks") and m._forward_pre_hooks for m in model.modules())


def test_a_trainer_learns_masks_closer_to_a_teachers_and_gives_the_model_back_as_it_was(tmp_path):
    model = tiny_llama()
    layers = select_layers(model, SparsityConfig()).targets
    generator = torch.Generator().manual_seed(1)
    target = {
        n: nm_mask_from_scores(torch.rand(layer.weight.shape, generator=generator)) for n, layer in layers.items()
    }
    teacher = masked(model, target)  # the same weights, other masks: the masks to find
    prior = {name: nm_mask(layer.weight) for name, layer in layers.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag of the user's, given back as it was

    loss = DistillationLoss(teacher, model, temperature=1.0)
    trainer_args = args(tmp_path, 100)
    masks = learn_masks(model, token_data(), trainer_args, prior=prior, compute_loss_func=loss)

    assert set(masks) == set(layers) and all(is_nm(m.float(), 2, 4) for m in masks.values())
    assert agreement(masks, target) > agreement(prior, target) + 0.08  # chance is 1/6 a group
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = teacher(input_ids=ids).logits
        error = {k: (masked(model, m)(input_ids=ids).logits - want).norm() for k, m in (("prior", prior),
                                                                                         ("learned", masks))}  # fmt: skip
    assert error["learned"] < 0.8 * error["prior"]
    # the model as it was: weights, requires_grad flags, train mode; the Trainer's args as they were
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert model.training and trainer_args.remove_unused_columns


def test_the_temperature_anneals_to_its_end_and_the_log_says_how_many_groups_changed(tmp_path):
    model = tiny_llama()
    seen = []

    class Logs(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    learning = MaskLearningConfig(temperature_start=2.0, temperature_end=0.1)
    learn_masks(model, token_data(64), args(tmp_path, 20), learning=learning, callbacks=[Logs()])
    logged = [row for row in seen if "mask_temperature" in row]
    assert logged[0]["mask_temperature"] < 2.0 and logged[-1]["mask_temperature"] == pytest.approx(0.1)
    assert all(0 <= row["mask_changed"] <= 1 for row in logged)


def test_bad_priors_and_settings_are_refused_naming_what_to_fix():
    model = tiny_llama()
    layers = select_layers(model, SparsityConfig()).targets
    prior = {name: nm_mask(layer.weight) for name, layer in layers.items()}
    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match=f"prior mask of {name} does not keep exactly 2 of every 4"):
        MaskLearner(model, layers, {**prior, name: torch.ones_like(prior[name])})
    with pytest.raises(ValueError, match="no prior mask for"):
        MaskLearner(model, layers, {k: v for k, v in prior.items() if k != name})
    learner = MaskLearner(model, layers, prior)
    with torch.no_grad():
        learner.logits["model__layers__0__mlp__down_proj"][3, 1, 0] = float("nan")
    with pytest.raises(RuntimeError, match=f"mask logits of \\['{name}'\\] are not finite"):
        learner.hard_masks()
    with pytest.raises(ValueError, match="0 < temperature_end <= temperature_start"):
        MaskLearningConfig(temperature_start=0.1, temperature_end=1.0)
    with pytest.raises(ValueError, match="gradient_checkpointing=True would recompute the forward pass"):
        learn_masks(model, token_data(16), TrainingArguments("/tmp/never", gradient_checkpointing=True, use_cpu=True))
    with pytest.raises(ValueError, match="cannot be recomputed during training"):
        SparsityConfig(criterion="learned", mask_update_every=10)
    with pytest.raises(ValueError, match="learn them first and pass them on"):
        prune_(model, SparsityConfig(criterion="learned"))
    assert all(not is_nm(layer.weight, 2, 4) for layer in layers.values())  # nothing was pruned


def test_learned_masks_are_held_through_a_recovery_and_named_in_the_checkpoint(tmp_path):
    from hf_sparse import save_pretrained

    model = tiny_llama()
    masks = learn_masks(model, token_data(64), args(tmp_path / "learn", 10))
    trainer = Trainer(model=model, args=args(tmp_path / "recover", 5, lr=1e-3), train_dataset=token_data(64),
                      callbacks=[SparsityCallback(SparsityConfig(criterion="learned"), masks=masks)])  # fmt: skip
    trainer.train()
    layers = select_layers(model, SparsityConfig()).targets
    assert all(torch.equal(layer.weight != 0, masks[name]) for name, layer in layers.items())
    save_pretrained(model, tmp_path / "out")
    sparsity = json.loads((tmp_path / "out" / "config.json").read_text())["sparsity"]
    assert sparsity["criterion"] == "learned"


def test_prune_applies_given_masks_names_their_criterion_and_refuses_ones_that_do_not_fit():
    model = tiny_llama()
    layers = select_layers(model, SparsityConfig()).targets
    generator = torch.Generator().manual_seed(3)
    masks = {
        n: nm_mask_from_scores(torch.rand(layer.weight.shape, generator=generator)) for n, layer in layers.items()
    }
    name = "model.layers.0.self_attn.o_proj"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [({k: v for k, v in masks.items() if k != name}, f"one mask per selected layer; missing \\['{name}'\\]"),
           ({**masks, name: masks[name][:, :16]}, f"the mask of {name} has shape \\(32, 16\\), its weight \\(32, 32\\)"),
           ({**masks, name: torch.ones_like(masks[name])}, f"the mask of {name} is not 2:4")]  # fmt: skip
    for given, words in bad:
        with pytest.raises(ValueError, match=words):
            prune_(model, SparsityConfig(criterion="learned"), masks=given)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing changed
    applied = prune_(model, SparsityConfig(criterion="learned"), masks=masks)
    assert all(torch.equal(layers[n].weight != 0, masks[n]) and torch.equal(applied[n], masks[n]) for n in masks)
    assert model.config.sparsity["criterion"] == "learned"
