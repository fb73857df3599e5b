"""A 2:4 checkpoint through lm-evaluation-harness's `hf` model (`HFLM`), as the README's command runs it: the
standard folder with plain transformers, the compact one after `import hf_sparse`. lm-evaluation-harness is not a
dependency (`pip install lm_eval`); its tasks need the Hub, so the check scores requests given here."""

from __future__ import annotations

import pytest

import hf_sparse
from hf_sparse.lm import byte_tokenizer
from tests.test_lm_evaluation import tiny_llama

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm_eval)")

PAIRS = [("The capital of France is", " Paris"), ("Two plus two is", " four"), ("Water boils at", " 100 degrees")]


@pytest.mark.parametrize("compact", [False, True], ids=["standard", "compact"])
def test_a_sparse_checkpoint_scores_in_the_harness_as_the_model_in_memory(tmp_path, compact):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = byte_tokenizer()
    model = tiny_llama(tokenizer).eval()
    masks = hf_sparse.prune_(model)
    hf_sparse.save_pretrained(model, tmp_path, compact=compact)
    tokenizer.save_pretrained(tmp_path)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)]

    loaded = HFLM(pretrained=str(tmp_path), device="cpu", batch_size=2, dtype="float32")
    in_memory = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=2)

    assert loaded.loglikelihood(requests) == in_memory.loglikelihood(requests)
    layers = {name: module for name, module in loaded.model.named_modules() if name in masks}
    assert len(layers) == 14 and all(r.is_nm for r in hf_sparse.sparsity_report(loaded.model, layers=list(layers)))
