"""Compact checkpoints through plain `from_pretrained` (transformers' quantizer registry), with and without
hf-sparse imported, and the Trainer on a model loaded that way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForQuestionAnswering, BertForQuestionAnswering, Trainer, TrainingArguments

import hf_sparse
from hf_sparse import SparseCheckpointError, SparsityCallback
from hf_sparse.checkpoint import COMPACT_WEIGHTS_NAME, VALUES_SUFFIX
from hf_sparse.masks import is_nm
from tests.conftest import RandomQADataset, subprocess_env, tiny_bert_config

LAYER = "bert.encoder.layer.1.intermediate.dense"


@pytest.fixture
def compact(tmp_path):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    masks = hf_sparse.prune_(model)  # also records config.sparsity, so the compact save needs nothing else
    hf_sparse.save_pretrained(model, tmp_path / "compact", compact=True)
    return model, masks, tmp_path / "compact"


def test_plain_from_pretrained_loads_a_compact_checkpoint_with_identical_tensors(compact):
    model, masks, folder = compact
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"].startswith("hf-sparse")
    loaded, info = AutoModelForQuestionAnswering.from_pretrained(folder, output_loading_info=True)
    assert type(loaded) is BertForQuestionAnswering
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert [k for k in saved if not torch.equal(saved[k], restored[k])] == []
    assert all(is_nm(loaded.get_submodule(name).weight) for name in masks)
    # An ordinary dense model afterwards: no quantizer, trainable, and saved as a standard checkpoint.
    assert getattr(loaded, "hf_quantizer", None) is None and not getattr(loaded, "is_quantized", False)
    assert not hasattr(loaded.config, "quantization_config") and not hasattr(loaded.config, "transformers_weights")
    assert loaded.config.sparsity["format"] == "dense"
    assert all(p.requires_grad for p in loaded.parameters())


def test_without_hf_sparse_the_load_fails_naming_hf_sparse(compact):
    _, _, folder = compact
    code = (
        "import sys\n"
        "from transformers import AutoModelForQuestionAnswering\n"
        f"try:\n    AutoModelForQuestionAnswering.from_pretrained({str(folder)!r})\n"
        "except Exception as err:\n    print(type(err).__name__, err)\n"
        "else:\n    print('LOADED')\n"
        "assert not [m for m in sys.modules if m.startswith('hf_sparse')], 'hf_sparse was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED" not in result.stdout
    assert "hf-sparse" in result.stdout and "import hf_sparse" in result.stdout, result.stdout
    # transformers first warns (stderr) that it does not know the quant_method and advises deleting
    # quantization_config, which would not help: the warning must give hf-sparse's advice before its own.
    (warning,) = [line for line in result.stderr.splitlines() if "Unknown quantization type" in line]
    assert "install hf-sparse and `import hf_sparse`" in warning, warning
    assert warning.index("import hf_sparse") < warning.index("delete the quantization_config"), warning


def test_damaged_compact_file_fails_plain_from_pretrained_naming_the_layer(compact):
    _, _, folder = compact
    file = folder / COMPACT_WEIGHTS_NAME
    tensors = load_file(file)
    values = tensors[f"{LAYER}.weight{VALUES_SUFFIX}"]
    values[values != 0] = 0.0  # still decodes, but not to the values saved (nor to the zeros the metadata records)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} in {file}: its stored values.* not those saved"):
        AutoModelForQuestionAnswering.from_pretrained(folder)


def test_trainer_fine_tunes_resumes_and_reloads_best_from_a_compact_load(compact, tmp_path):
    _, masks, folder = compact
    model = AutoModelForQuestionAnswering.from_pretrained(folder)
    args = dict(
        per_device_train_batch_size=8, learning_rate=1e-2, report_to="none", use_cpu=True, save_steps=2,
        eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
        save_total_limit=2, disable_tqdm=True, seed=0,
    )  # fmt: skip
    out = tmp_path / "run"
    trainer = Trainer(model, TrainingArguments(str(out), max_steps=2, **args), train_dataset=RandomQADataset(32),
                      eval_dataset=RandomQADataset(16), callbacks=[SparsityCallback()])  # fmt: skip
    trainer.train()
    checkpoint = json.loads((out / "checkpoint-2" / "config.json").read_text())
    assert "quantization_config" not in checkpoint and checkpoint["sparsity"]["format"] == "dense"
    # Resume to step 4 from the Trainer's checkpoint, then reload the best one at the end.
    resumed = Trainer(AutoModelForQuestionAnswering.from_pretrained(folder), TrainingArguments(str(out), max_steps=4, **args),
                      train_dataset=RandomQADataset(32), eval_dataset=RandomQADataset(16),
                      callbacks=[SparsityCallback()])  # fmt: skip
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 4 and resumed.state.best_model_checkpoint is not None
    assert all(is_nm(resumed.model.get_submodule(name).weight) for name in masks)


DISK_MAPS = {
    "all-cpu": {"": "cpu"},
    "one-block-on-disk": {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk",
                          "bert.pooler": "cpu", "qa_outputs": "cpu"},
}  # fmt: skip


@pytest.mark.parametrize("device_map", DISK_MAPS.values(), ids=DISK_MAPS.keys())
@pytest.mark.parametrize("loader", ["plain", "hf_sparse"])
def test_device_map_with_disk_offload_loads_and_runs_the_same_model(compact, tmp_path, loader, device_map):
    """Offloaded layers are decoded while loading and offloaded dense (before: KeyError '...weight' at the first
    forward through plain from_pretrained, a meta-tensor error in hf_sparse.from_pretrained)."""
    model, masks, folder = compact
    load = AutoModelForQuestionAnswering.from_pretrained if loader == "plain" else hf_sparse.from_pretrained
    loaded = load(folder, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model.eval()(input_ids=ids), loaded(input_ids=ids)
    assert torch.equal(got.start_logits, expected.start_logits) and torch.equal(got.end_logits, expected.end_logits)
    on_disk = [name for name, p in loaded.named_parameters() if p.device.type == "meta"]
    assert bool(on_disk) == ("disk" in device_map.values())


def test_a_listed_layer_missing_from_the_compact_file_fails_plain_from_pretrained(compact):
    _, _, folder = compact
    file = folder / COMPACT_WEIGHTS_NAME
    tensors = load_file(file)
    del tensors[f"{LAYER}.weight{VALUES_SUFFIX}"], tensors[f"{LAYER}.weight.nm_indices"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(
        SparseCheckpointError, match=rf"\['{LAYER}'\] are listed as sparse .* holds no compact tensors"
    ):
        AutoModelForQuestionAnswering.from_pretrained(folder)
    del tensors[f"{LAYER.replace('intermediate', 'output')}.weight.nm_indices"]  # values without positions
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(
        SparseCheckpointError, match=r"layer bert.encoder.layer.1.output.dense: tensor .*nm_indices is "
    ):
        AutoModelForQuestionAnswering.from_pretrained(folder)


def test_a_folder_saved_with_the_earlier_quant_method_name_still_loads(compact):
    model, _, folder = compact
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "hf-sparse"  # the name before it carried the advice
    (folder / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForQuestionAnswering.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
