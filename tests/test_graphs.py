"""CUDA graph capture must not change which attention kernel a transformers model gets (CPU-testable part)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForQuestionAnswering

from hf_sparse.inference.cuda_graphs import attention_masks_skippable_while_capturing
from tests.conftest import tiny_bert_config


def _masks_seen_by_sdpa(model, inputs, monkeypatch):
    """Runs `model` as if a CUDA graph were being captured; returns the attn_mask of every SDPA call."""
    import transformers.utils.import_utils as import_utils

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    with torch.no_grad():
        model(**inputs)
    return seen


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = tiny_bert_config()
    config._attn_implementation = "sdpa"
    return BertForQuestionAnswering(config).eval()


def test_capture_without_padding_mask_passes_no_mask_to_sdpa(model, monkeypatch):
    inputs = {"input_ids": torch.randint(0, 128, (2, 16))}
    with attention_masks_skippable_while_capturing():
        seen = _masks_seen_by_sdpa(model, inputs, monkeypatch)
    assert len(seen) == 2 and all(mask is None for mask in seen)  # flash / cuDNN attention stay possible


def test_a_given_padding_mask_is_kept_while_capturing(model, monkeypatch):
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    inputs = {"input_ids": torch.randint(0, 128, (2, 16)), "attention_mask": mask}
    with attention_masks_skippable_while_capturing():
        seen = _masks_seen_by_sdpa(model, inputs, monkeypatch)
    assert len(seen) == 2 and all(m is not None for m in seen)


def test_the_rule_applies_only_inside_the_context():
    from transformers import masking_utils

    original = masking_utils.is_tracing
    with attention_masks_skippable_while_capturing():
        assert masking_utils.is_tracing(None) is False
        assert masking_utils.is_tracing is not original
    assert masking_utils.is_tracing is original


# -- a swapped model's own graphs (EagerGraphs): what holds without a GPU --------------------------------------------


def test_eager_graphs_run_the_plain_forward_without_a_gpu_and_survive_copies():
    import copy
    import pickle

    from hf_sparse.inference.cuda_graphs import EagerGraphs

    model = nn.Linear(4, 2)
    model.forward = EagerGraphs(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(model(x), F.linear(x, model.weight, model.bias))
    assert model.forward.captures == 0  # no CUDA: nothing to capture, nothing fails
    assert model.forward._key((x,), {}) is None
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        runner = twin.__dict__["forward"]
        assert isinstance(runner, EagerGraphs) and runner.model is twin and runner is not model.forward
        assert runner._forward.__self__ is twin  # the copy's own forward, not the original's (nor the runner)
        with torch.no_grad():
            assert torch.equal(twin(x), model(x))


def test_eager_graphs_key_only_what_a_graph_can_replay(monkeypatch):
    from hf_sparse.inference.cuda_graphs import EagerGraphs

    model = nn.Linear(4, 2).eval()
    runner = EagerGraphs(model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    x = torch.randn(3, 4)  # on the CPU: never graphed
    with torch.no_grad():
        assert runner._key((x,), {}) is None
        assert runner._key((), {"cache": object()}) is None  # a type a graph cannot be keyed on


def test_only_plain_values_go_in_and_out_of_a_graph():
    # A KV cache (hashable, mutable) must not become part of a graph's key or output: the capture would change the
    # caller's cache and replays would share one object.
    from transformers import DynamicCache
    from transformers.modeling_outputs import QuestionAnsweringModelOutput

    from hf_sparse.inference.cuda_graphs import _plain

    assert _plain({"input_ids": torch.ones(2, 3), "return_dict": True, "dtype": torch.float16, "mask": None})
    assert _plain(QuestionAnsweringModelOutput(start_logits=torch.ones(2), end_logits=torch.ones(2)))
    assert not _plain({"past_key_values": DynamicCache()})
    assert not _plain([torch.ones(1), object()])


def test_forward_hooks_keep_calls_out_of_graphs():
    from hf_sparse.inference.cuda_graphs import EagerGraphs, _hooked

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    runner = EagerGraphs(model)
    assert not _hooked(runner._facts_now()[0])
    handle = model[1].register_forward_hook(lambda module, args, output: None)  # a replay would never call it
    assert _hooked(runner._facts_now()[0])  # the listed dicts see hooks registered after they were listed
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    try:
        assert _hooked(runner._facts_now()[0])
    finally:
        handle.remove()
    assert not _hooked(runner._facts_now()[0])
