"""Every Python block of README.md runs, in order, pasted one after another, as the README says.

The README's blocks assume a `model`, its `tokenizer`, a training set `train` and a list of `texts`; the prelude
below gives tiny ones. Where a block reaches the network, `SUBSTITUTIONS` says what replaces what: a local SQuAD file
for the Hub's `squad`, and a fake Hub server (tests/test_hub.py) for huggingface.co. Blocks that need a CUDA GPU are
skipped on a machine without one (and say so).
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

from tests.conftest import REPO

PRELUDE = """
import torch
from transformers import BertForQuestionAnswering
from hf_sparse.squad import synthetic_squad, synthetic_tokenizer
from tests.conftest import RandomQADataset, tiny_bert_config

tokenizer = synthetic_tokenizer()
torch.manual_seed(0)
model = BertForQuestionAnswering(tiny_bert_config(vocab_size=len(tokenizer), max_position_embeddings=512))
train = RandomQADataset(16, vocab_size=len(tokenizer))
squad = synthetic_squad(12, 3, seed=1)
texts = [p["context"] for a in squad["data"] for p in a["paragraphs"]] * 22
"""

SUBSTITUTIONS = {
    # README text -> what the test runs instead (no network here).
    'load_squad("squad", split="validation")': 'load_squad("dev-v1.1.json", split="validation")',
    'load_squad("squad", split="train")': 'load_squad("dev-v1.1.json", split="train")',
    "    private=True,\n": "    private=True,\n    endpoint=HUB_URL,\n    token=HUB_TOKEN,\n",
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_every_python_block_of_the_readme_runs_in_order(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="install the test extra: pip install -e '.[test]'")
    from tests.test_hub import GOOD, FakeHub, online

    online(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.syspath_prepend(str(REPO))
    hub = FakeHub()
    threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    blocks = python_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 9
    used = {old: False for old in SUBSTITUTIONS}
    namespace: dict = {"HUB_URL": hub.url, "HUB_TOKEN": GOOD}
    try:
        exec(PRELUDE, namespace)  # noqa: S102
        (tmp_path / "dev-v1.1.json").write_text(json.dumps(namespace["squad"]))
        ran, skipped = 0, []
        for i, block in enumerate(blocks):
            if ".cuda()" in block and not torch.cuda.is_available():
                skipped.append(i)
                continue
            for old, new in SUBSTITUTIONS.items():
                if old in block:
                    block, used[old] = block.replace(old, new), True
            try:
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
            except Exception as err:
                raise AssertionError(f"README.md python block {i} failed:\n{block}") from err
            ran += 1
    finally:
        hub.shutdown()
        hub.server_close()
    assert all(used.values()), f"substitutions whose README text is gone: {[k for k, v in used.items() if not v]}"
    assert ran + len(skipped) == len(blocks) and len(skipped) <= 2, skipped  # the fp16 and the FP8 inference
    # What the blocks promise: a 2:4 model merged from LoRA, a compact folder, an upload.
    from hf_sparse.masks import is_nm

    merged = namespace["merged"]
    assert all(is_nm(merged.get_submodule(name).weight) for name in merged.config.sparsity["layers"])
    assert (tmp_path / "out-compact" / "hf_sparse_model.safetensors").is_file()
    assert "you/bert-squad-2of4" in hub.repos
