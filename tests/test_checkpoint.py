"""Sparse checkpoints: Trainer -> save -> plain from_pretrained, the compact format, and damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForQuestionAnswering, BertForQuestionAnswering, Trainer, TrainingArguments

import hf_sparse
from hf_sparse import SparsityCallback, SparsityConfig, prune_
from hf_sparse.checkpoint import (
    COMPACT_WEIGHTS_NAME,
    INDICES_SUFFIX,
    VALUES_SUFFIX,
    SparseCheckpointError,
    compact_decode,
    compact_encode,
)
from tests.conftest import RandomQADataset, tiny_bert_config

LAYER = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT QA trained 4 steps with SparsityCallback and saved with Trainer.save_model."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomQADataset(32), callbacks=[SparsityCallback()])
    trainer.train()
    trainer.save_model(str(out / "final"))
    model.eval()
    return model, out / "final"


def _inputs():
    return {"input_ids": torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))}


def _outputs(model):
    with torch.no_grad():
        out = model(**_inputs())
    return out.start_logits, out.end_logits


def test_trainer_checkpoint_loads_with_plain_from_pretrained(trained):
    model, path = trained
    config = json.loads((path / "config.json").read_text())
    meta = config["sparsity"]
    assert meta["sparsity_pattern"] == "2:4" and meta["criterion"] == "magnitude" and meta["format"] == "dense"
    assert meta["library"] == "hf-sparse" and meta["library_version"] == hf_sparse.__version__
    assert len(meta["layers"]) == 12  # 6 nn.Linear per block x 2 blocks
    assert all(info["sparsity"] == 0.5 for info in meta["layers"].values())
    assert meta["total_sparsity"] == 0.5

    loaded, info = AutoModelForQuestionAnswering.from_pretrained(path, output_loading_info=True)
    assert {k: sorted(v) for k, v in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    for name in meta["layers"]:
        saved = loaded.get_submodule(name).weight
        assert torch.equal(saved, model.get_submodule(name).weight)
        assert int((saved == 0).sum()) == saved.numel() // 2
        assert hf_sparse.masks.is_nm(saved)
    for a, b in zip(_outputs(loaded.eval()), _outputs(model)):
        assert torch.equal(a, b)
    assert loaded.config.sparsity == meta


def test_compact_round_trip_and_size(trained, tmp_path):
    model, _ = trained
    half = BertForQuestionAnswering(tiny_bert_config()).half()
    half.load_state_dict({k: v.half() for k, v in model.state_dict().items()})
    half.config.sparsity = model.config.sparsity
    hf_sparse.save_pretrained(half, tmp_path / "dense")
    meta = hf_sparse.save_pretrained(half, tmp_path / "compact", compact=True)
    assert meta["format"] == "compact"
    assert meta == json.loads((tmp_path / "compact" / "config.json").read_text())["sparsity"]  # what it wrote
    assert sorted(p.name for p in (tmp_path / "compact").iterdir()) == ["config.json", COMPACT_WEIGHTS_NAME]

    dense_bytes, compact_bytes = 0, 0
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as f:
        dense = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "compact" / COMPACT_WEIGHTS_NAME), "pt") as f:
        compact = {k: f.get_tensor(k) for k in f.keys()}
    for name in meta["layers"]:
        key = f"{name}.weight"
        dense_bytes += dense[key].numel() * dense[key].element_size()
        compact_bytes += sum(
            compact[key + s].numel() * compact[key + s].element_size() for s in (VALUES_SUFFIX, INDICES_SUFFIX)
        )
    ratio = compact_bytes / dense_bytes
    # fp16 values: half the weights (8 bits per weight) + 2-bit positions of the kept two (1 bit per weight).
    assert ratio == pytest.approx(9 / 16)
    assert ratio <= 0.6
    # Every other tensor is stored unchanged.
    for key, tensor in dense.items():
        if key.removesuffix(".weight") not in meta["layers"]:
            assert torch.equal(compact[key], tensor)

    loaded = hf_sparse.from_pretrained(tmp_path / "compact")
    assert type(loaded) is BertForQuestionAnswering and loaded.dtype == torch.float16
    for key, tensor in half.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.config.sparsity["format"] == "dense"  # in memory it is an ordinary model again
    from_dense = hf_sparse.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    for a, b in zip(_outputs(from_dense), _outputs(loaded.float())):
        assert torch.equal(a, b)
    # Plain from_pretrained reads it too, once hf_sparse is imported (tests/test_quantizer.py: without it).
    plain = BertForQuestionAnswering.from_pretrained(tmp_path / "compact")
    assert plain.dtype == torch.float16
    for key, tensor in half.state_dict().items():
        assert torch.equal(plain.state_dict()[key], tensor), key


def test_compact_encoding_is_exact_including_short_groups():
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.5, 0.0, 0.0, -2.0], [0.0, 3.0, 0.0, 0.0, -1.0, 2.0, 0.0, 0.0]])
    values, packed = compact_encode(weight, 2, 4)
    assert values.tolist() == [[0.0, 0.0, 1.5, -2.0], [0.0, 3.0, -1.0, 2.0]]
    assert packed.dtype == torch.uint8 and packed.numel() == 2  # 4 groups x 2 positions x 2 bits = 16 bits
    assert torch.equal(compact_decode(values, packed, 2, 4), weight)
    with pytest.raises(ValueError, match="1 group"):
        compact_encode(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2, 4, "x")


def test_save_refuses_a_layer_that_is_not_nm(tiny_qa_model, tmp_path):
    prune_(tiny_qa_model)
    with torch.no_grad():
        tiny_qa_model.get_submodule(LAYER).weight[0, :4] = 1.0
    with pytest.raises(ValueError, match=f"layer {LAYER} is not 2:4"):
        hf_sparse.save_pretrained(tiny_qa_model, tmp_path, config=SparsityConfig())
    assert not (tmp_path / "config.json").exists()


def test_save_without_metadata_or_config_says_what_to_pass(tiny_qa_model, tmp_path):
    with pytest.raises(ValueError, match="pass the SparsityConfig"):
        hf_sparse.save_pretrained(tiny_qa_model, tmp_path)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    prune_(model)
    hf_sparse.save_pretrained(model, tmp_path / "dense", config=SparsityConfig())
    hf_sparse.save_pretrained(model, tmp_path / "compact", compact=True)
    return tmp_path


def test_tampered_dense_values_name_layer_and_file(saved):
    file = saved / "dense" / "model.safetensors"
    tensors = load_file(file)
    tensors[f"{LAYER}.weight"][5, :3] = 0.25  # a group with 3 nonzeros
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} in {file} is not 2:4 sparse \(1 group"):
        hf_sparse.from_pretrained(saved / "dense")


def test_values_changed_but_still_nm_disagree_with_metadata(saved):
    file = saved / "dense" / "model.safetensors"
    tensors = load_file(file)
    weight = tensors[f"{LAYER}.weight"]
    weight[0, weight[0] != 0] = 0.0  # zero the kept weights of row 0: still 2:4, but zeros differ from metadata
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} in {file} has \d+ zeros but the metadata"):
        hf_sparse.from_pretrained(saved / "dense")


def test_tampered_compact_positions_name_layer_and_file(saved):
    file = saved / "compact" / COMPACT_WEIGHTS_NAME
    tensors = load_file(file)
    tensors[f"{LAYER}.weight{INDICES_SUFFIX}"][0] = 0  # group 0 positions (0, 0): not distinct
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} in {file}: group 0 has positions \[0, 0\]"):
        hf_sparse.from_pretrained(saved / "compact")


def test_missing_tensor_names_layer_and_file(saved):
    file = saved / "compact" / COMPACT_WEIGHTS_NAME
    tensors = load_file(file)
    del tensors[f"{LAYER}.weight{VALUES_SUFFIX}"]
    save_file(tensors, file)
    with pytest.raises(
        SparseCheckpointError, match=rf"layer {LAYER}: tensor .*{VALUES_SUFFIX} is missing from {file}"
    ):
        hf_sparse.from_pretrained(saved / "compact")
    dense = saved / "dense" / "model.safetensors"
    tensors = load_file(dense)
    del tensors[f"{LAYER}.weight"]
    save_file(tensors, dense)
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER}: tensor {LAYER}.weight is missing from {dense}"):
        hf_sparse.from_pretrained(saved / "dense")


def test_missing_non_sparse_tensor_is_an_error_not_a_random_init(saved):
    file = saved / "compact" / COMPACT_WEIGHTS_NAME
    tensors = load_file(file)
    del tensors["qa_outputs.weight"]
    save_file(tensors, file)
    with pytest.raises(SparseCheckpointError, match=rf"{file} lacks weights \['qa_outputs.weight'\]"):
        hf_sparse.from_pretrained(saved / "compact")


def test_wrong_metadata_is_reported(saved):
    config_file = saved / "dense" / "config.json"
    config = json.loads(config_file.read_text())
    config["sparsity"]["layers"]["bert.embeddings.word_embeddings"] = {"zeros": 0}  # dense, not 2:4
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        SparseCheckpointError, match=r"layer bert.embeddings.word_embeddings in .*model.safetensors is not 2:4"
    ):
        hf_sparse.from_pretrained(saved / "dense")
    config["sparsity"]["sparsity_pattern"] = "4:2"
    config_file.write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match=rf"{config_file}: sparsity_pattern '4:2'"):
        hf_sparse.from_pretrained(saved / "dense")


@pytest.mark.parametrize("fmt,name", [("dense", "model.safetensors"), ("compact", COMPACT_WEIGHTS_NAME)])
def test_truncated_file_names_the_file(saved, fmt, name):
    file = saved / fmt / name
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(SparseCheckpointError, match=rf"{file} .*truncated or damaged"):
        hf_sparse.from_pretrained(saved / fmt)


def test_fast_load_explains_it_needs_a_gpu(saved):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU message is tested on CPU machines")
    with pytest.raises(RuntimeError, match="need a CUDA GPU.*fast=False"):
        hf_sparse.from_pretrained(saved / "compact", fast=True)


def test_swapped_layers_save_through_their_state_dict(saved, tmp_path):
    """A layer whose weight is held by a module that only exposes it through `state_dict` (as the
    semi-structured layers do) is measured and saved like a plain nn.Linear."""
    model = hf_sparse.from_pretrained(saved / "dense")
    linear = model.get_submodule(LAYER)

    class Swapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._inner = [inner]  # not a submodule: the weight is only reachable through state_dict

        def forward(self, x):
            return self._inner[0](x)

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            destination[prefix + "weight"] = self._inner[0].weight.detach()
            destination[prefix + "bias"] = self._inner[0].bias.detach()

    parent = model.get_submodule(LAYER.rsplit(".", 1)[0])
    parent.query = Swapped(linear)
    meta = hf_sparse.save_pretrained(model, tmp_path / "out", compact=True)
    assert meta["layers"][LAYER]["sparsity"] == 0.5
    reloaded = hf_sparse.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.get_submodule(LAYER).weight, linear.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_fast_load_on_gpu_gives_the_dense_answers(saved):
    dense = hf_sparse.from_pretrained(saved / "dense").half().cuda()
    fast = hf_sparse.from_pretrained(saved / "compact", fast=True)  # fp32 on disk: cast to fp16, then swapped
    assert next(fast.parameters()).dtype == torch.float16
    ids = torch.randint(0, dense.config.vocab_size, (4, 32), device="cuda")
    with torch.no_grad():
        a, b = dense(input_ids=ids), fast(input_ids=ids)
    assert torch.allclose(a.start_logits.float(), b.start_logits.float(), atol=2e-2, rtol=2e-2)


def export_fp8(layer, input_scale=0.0625):
    """Makes `layer` answer the FP8 codec as an FP8 layer does (`compact_fp8_tensors()`): its weight quantized to
    e4m3 with one scale per row (the CPU quantizes and stores e4m3; only FP8 GEMMs need the GPU)."""
    weight = layer.weight.detach()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 448.0  # per-row scales to e4m3's largest value
    values = (weight / scales[:, None]).to(torch.float8_e4m3fn)
    layer.compact_fp8_tensors = lambda: (values, scales, input_scale)
    return values, scales


def test_a_layer_exporting_fp8_tensors_is_saved_by_the_fp8_codec(saved, tmp_path):
    """The FP8 codec asks each layer for its tensors (`compact_fp8_tensors()`), not for its internals: any layer
    that answers is stored as e4m3 values + positions + row scales + input scale, and loads dequantized."""
    model = hf_sparse.from_pretrained(saved / "dense")
    values, scales = export_fp8(model.get_submodule(LAYER))
    hf_sparse.save_pretrained(model, tmp_path / "fp8", compact=True)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["format"].startswith("compact-nm-fp8-")
    assert config["sparsity"]["fp8"] == {"activation_scales": "static", "layers": [LAYER]}
    with safe_open(str(tmp_path / "fp8" / COMPACT_WEIGHTS_NAME), "pt") as f:
        assert f.get_tensor(f"{LAYER}.weight{VALUES_SUFFIX}").dtype == torch.float8_e4m3fn
    state, meta = hf_sparse.checkpoint.load_state_dict(tmp_path / "fp8")
    assert torch.equal(state[f"{LAYER}.weight"], values.float() * scales[:, None])
    assert meta["fp8"]["input_scales"] == {LAYER: 0.0625}


# -- checksums of the compact format -------------------------------------------------------------------------------

LOADERS = {"hf_sparse": hf_sparse.from_pretrained, "plain": AutoModelForQuestionAnswering.from_pretrained}
PAIRS = [(a, b) for a in range(4) for b in range(a + 1, 4)]  # the 2:4 positions a group may hold


def _move_positions(packed):
    """The first group of a 2:4 layer moved to other (valid, increasing) positions: it still decodes to 2:4 with the
    same zeros, so only a checksum can tell."""
    byte = int(packed[0])
    old = (byte & 3, (byte >> 2) & 3)
    a, b = next(p for p in PAIRS if p != old)
    packed[0] = (byte & 0xF0) | a | (b << 2)


def _nan_value(values):
    values[0, 0] = float("nan")  # a NaN is a nonzero: still 2:4, the same zeros


def _changed_value(values):
    values[3, 1] = values[3, 1] * 1.5


def _tamper(folder, layer, change, part=VALUES_SUFFIX):
    file = folder / COMPACT_WEIGHTS_NAME
    tensors = load_file(file)
    change(tensors[f"{layer}.weight{part}"])
    save_file(tensors, file, metadata={"format": "pt"})
    return file


TAMPERS = {
    "moved-positions": (_move_positions, INDICES_SUFFIX),
    "nan-value": (_nan_value, VALUES_SUFFIX),
    "changed-value": (_changed_value, VALUES_SUFFIX),
}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_a_loaded_model_keeps_no_checksums_of_the_file_it_came_from(saved, loader, tmp_path):
    config = json.loads((saved / "compact" / "config.json").read_text())
    assert set(config["sparsity"]["compact_sha256"]) == set(config["sparsity"]["layers"])
    loaded = loader(saved / "compact")
    assert loaded.config.sparsity["format"] == "dense" and "compact_sha256" not in loaded.config.sparsity
    loaded.save_pretrained(tmp_path / "resaved")  # a standard checkpoint, whose metadata says only that
    assert "compact_sha256" not in json.loads((tmp_path / "resaved" / "config.json").read_text())["sparsity"]


@pytest.mark.parametrize("tamper", TAMPERS.values(), ids=TAMPERS.keys())
@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_changed_values_or_positions_are_refused_naming_file_and_layer(saved, loader, tamper):
    change, part = tamper
    file = _tamper(saved / "compact", LAYER, change, part)  # before checksums: loaded silently by both loaders
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} in {file}: its stored values.* not those saved"):
        loader(saved / "compact")


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_a_nan_value_is_refused_even_with_its_checksum_recomputed(saved, loader):
    from hf_sparse.checkpoint.compact import layer_checksum, layer_parts

    file = _tamper(saved / "compact", LAYER, _nan_value)
    tensors = load_file(file)
    config_file = saved / "compact" / "config.json"
    config = json.loads(config_file.read_text())
    config["sparsity"]["compact_sha256"][LAYER] = layer_checksum(layer_parts(tensors, tensors.get, LAYER))
    config_file.write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} in {file} holds 1 values that are not finite"):
        loader(saved / "compact")


def test_the_fp8_format_refuses_changed_values_positions_and_scales(saved, tmp_path):
    model = hf_sparse.from_pretrained(saved / "dense")
    export_fp8(model.get_submodule(LAYER))
    hf_sparse.save_pretrained(model, tmp_path / "fp8", compact=True)
    pristine = load_file(tmp_path / "fp8" / COMPACT_WEIGHTS_NAME)

    def e4m3_bit(v):
        v.view(torch.uint8)[2, 0] ^= 1  # the lowest mantissa bit of one e4m3 value

    changes = {
        f"{LAYER}.weight{VALUES_SUFFIX}": e4m3_bit,
        f"{LAYER}.weight{INDICES_SUFFIX}": _move_positions,
        f"{LAYER}.weight.fp8_scale": lambda s: s.mul_(2.0),  # still finite and positive
        f"{LAYER}.fp8_input_scale": lambda s: s.fill_(0.125),
    }
    for key, change in changes.items():  # before checksums: each loaded silently
        tensors = {k: v.clone() for k, v in pristine.items()}
        change(tensors[key])
        save_file(tensors, tmp_path / "fp8" / COMPACT_WEIGHTS_NAME)
        with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} in .*: its stored values.* not those saved"):
            hf_sparse.from_pretrained(tmp_path / "fp8")


def _as_version_1(folder):
    """The folder as hf-sparse wrote it before checksums (compact-nm-v1, no compact_sha256)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    del config["sparsity"]["compact_sha256"]
    config["quantization_config"]["format"] = "compact-nm-v1"
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_a_folder_from_before_checksums_loads_with_a_warning(saved, loader, caplog):
    _as_version_1(saved / "compact")
    with caplog.at_level("WARNING", logger="hf_sparse"):
        loaded = loader(saved / "compact")
    assert "without checksums" in caplog.text and "save_pretrained(model, folder, compact=True)" in caplog.text
    reference = hf_sparse.from_pretrained(saved / "dense")
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    _tamper(saved / "compact", LAYER, _nan_value)  # what the structure checks still refuse
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} .* not finite"):
        loader(saved / "compact")


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_edited_checksum_records_are_refused(saved, loader):
    config_file = saved / "compact" / "config.json"
    config = json.loads(config_file.read_text())
    del config["sparsity"]["compact_sha256"][LAYER]
    config_file.write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER}: compact_sha256 .* records no checksum for it"):
        loader(saved / "compact")
    del config["sparsity"]["compact_sha256"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match=r"compact-nm-v2 checkpoint records a checksum .* is missing"):
        loader(saved / "compact")
    config["quantization_config"]["format"] = "compact-nm-v9"
    config_file.write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match=r"format 'compact-nm-v9' is not one this hf-sparse reads"):
        loader(saved / "compact")


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_a_compact_layer_the_metadata_omits_is_refused_naming_it(saved, loader):
    """Before: plain from_pretrained left the omitted layer randomly initialised (only its load report said so)."""
    config_file = saved / "compact" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("layers", "compact_sha256"):
        del config["sparsity"][key][LAYER]
    config_file.write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match=rf"holds compact layers \['{LAYER}'\] that .*does not list"):
        loader(saved / "compact")


def _compile_prefixed(layers):
    """Layer names as a torch.compile'd model records them (its modules live under `_orig_mod`)."""
    return {f"_orig_mod.{name}": info for name, info in layers.items()}


def test_layer_names_recorded_through_torch_compile_load_and_save_compact(saved, tmp_path):
    """Before: hf_sparse.from_pretrained refused such a folder (tensor _orig_mod....weight missing), compact saving
    failed (no module named _orig_mod....) and plain from_pretrained of a compact one named a layer it lacks."""
    for fmt in ("dense", "compact"):
        config_file = saved / fmt / "config.json"
        config = json.loads(config_file.read_text())
        names = set(config["sparsity"]["layers"])
        config["sparsity"]["layers"] = _compile_prefixed(config["sparsity"]["layers"])
        if fmt == "compact":
            config["sparsity"]["compact_sha256"] = _compile_prefixed(config["sparsity"]["compact_sha256"])
        config_file.write_text(json.dumps(config))
        for load in LOADERS.values() if fmt == "compact" else [hf_sparse.from_pretrained]:
            loaded = load(saved / fmt)
            assert set(loaded.config.sparsity["layers"]) == names  # as the model names them
    model = hf_sparse.from_pretrained(saved / "dense")
    model.config.sparsity["layers"] = _compile_prefixed(model.config.sparsity["layers"])  # as the callback recorded
    meta = hf_sparse.save_pretrained(model, tmp_path / "compact", compact=True)
    assert set(meta["layers"]) == names
    written = json.loads((tmp_path / "compact" / "config.json").read_text())["sparsity"]
    assert set(written["layers"]) == set(written["compact_sha256"]) == names


def test_save_refuses_a_config_that_contradicts_the_recorded_metadata(tiny_qa_model, tmp_path):
    """Before: the config's criterion silently replaced the recorded one in config.json (and so in the card)."""
    prune_(tiny_qa_model)
    tiny_qa_model.config.sparsity["criterion"] = "sparsegpt"  # as recorded by a SparseGPT prune_
    with pytest.raises(ValueError, match=r"records criterion='sparsegpt' .* says 'magnitude'; nothing was saved"):
        hf_sparse.save_pretrained(tiny_qa_model, tmp_path, config=SparsityConfig())
    assert not (tmp_path / "config.json").exists() and tiny_qa_model.config.sparsity["criterion"] == "sparsegpt"
    meta = hf_sparse.save_pretrained(tiny_qa_model, tmp_path, config=SparsityConfig(criterion="sparsegpt"))
    assert meta["criterion"] == "sparsegpt"


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_a_value_that_overflows_the_requested_dtype_is_refused(tiny_qa_model, tmp_path, loader):
    """Before: a bf16 weight beyond float16's range loaded as inf with dtype=torch.float16, through both loaders."""
    model = tiny_qa_model.to(torch.bfloat16)
    prune_(model)
    with torch.no_grad():
        weight = model.get_submodule(LAYER).weight
        weight[0, weight[0] != 0] = 1e5  # bf16 holds it; float16 (max 65504) does not
    hf_sparse.save_pretrained(model, tmp_path, compact=True)
    assert loader(tmp_path).get_submodule(LAYER).weight.dtype == torch.bfloat16  # as saved: fine
    # another dtype that holds the values: fine too (the checksums are of the tensors as stored, whatever dtype= says)
    assert loader(tmp_path, dtype=torch.float32).get_submodule(LAYER).weight[0].abs().max() == 99840  # bf16 1e5
    with pytest.raises(SparseCheckpointError, match=rf"layer {LAYER} in .*: 32 of its values are beyond the range of"):
        loader(tmp_path, dtype=torch.float16)
