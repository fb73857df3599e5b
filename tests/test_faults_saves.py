"""Faults while saving and pushing: a save that fails at any point leaves the folder byte-identical (or loading as
before), the masks file is never half written, and Hub errors say what happened (nothing sent when nothing could
work). Nothing the user had is deleted before its replacement is in place."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertForQuestionAnswering

import hf_sparse
import hf_sparse.checkpoint as checkpoint
from hf_sparse import SparsityCallback, SparsityConfig, prune_
from hf_sparse.callback import MASKS_NAME
from hf_sparse.hub import HubPushError
from tests.conftest import tiny_bert_config
from tests.test_hub import GOOD, FakeHub, _snapshot, _train, hub  # noqa: F401  (hub is a fixture)


class Failure(Exception):
    pass


def _sparse_model(seed=0):
    torch.manual_seed(seed)
    model = BertForQuestionAnswering(tiny_bert_config())
    prune_(model)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A standard and a compact checkpoint of one sparse model."""
    root = tmp_path_factory.mktemp("saved")
    model = _sparse_model()
    hf_sparse.save_pretrained(model, root / "dense", config=SparsityConfig())
    hf_sparse.save_pretrained(model, root / "compact", compact=True)
    return root


def _fail_save_pretrained(monkeypatch, model):
    def fail(folder, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"half")  # a partial write, then the failure
        raise Failure("disk full")

    monkeypatch.setattr(model, "save_pretrained", fail)


def _fail_encode(monkeypatch, model):
    def fail(*args, **kwargs):
        raise Failure("encode")

    monkeypatch.setattr(checkpoint.compact, "compact_encode", fail)


def _fail_save_file(monkeypatch, model):
    def fail(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise Failure("disk full")

    monkeypatch.setattr(checkpoint.compact, "save_file", fail)


def _fail_moving(name):
    def patch(monkeypatch, model):
        real_replace, real_rename = os.replace, os.rename

        def fail_on(real):
            def move(src, dst, *args, **kwargs):
                if Path(dst).name == name:
                    raise Failure(f"cannot move {name}")
                return real(src, dst, *args, **kwargs)

            return move

        monkeypatch.setattr(os, "replace", fail_on(real_replace))
        monkeypatch.setattr(os, "rename", fail_on(real_rename))  # what shutil.move uses

    return patch


TO_COMPACT = {
    "save_pretrained": _fail_save_pretrained,
    "encoding": _fail_encode,
    "writing-the-compact-file": _fail_save_file,
    "moving-the-compact-file": _fail_moving(checkpoint.COMPACT_WEIGHTS_NAME),
    "moving-config.json": _fail_moving(checkpoint.CONFIG_NAME),
}
TO_DENSE = {
    "save_pretrained": _fail_save_pretrained,
    "moving-the-dense-file": _fail_moving(checkpoint.DENSE_WEIGHTS_NAME),
    "moving-config.json": _fail_moving(checkpoint.CONFIG_NAME),
}
CASES = [
    pytest.param(start, compact, failure, id=f"{start}->{'compact' if compact else 'dense'}-fails-at-{name}")
    for start in ("dense", "compact")
    for compact, failures in ((True, TO_COMPACT), (False, TO_DENSE))
    for name, failure in failures.items()
]


@pytest.mark.parametrize("start, compact, failure", CASES)
def test_a_failed_save_leaves_the_checkpoint_loading_as_before(saved, tmp_path, monkeypatch, start, compact, failure):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved / start, folder)
    before = _snapshot(folder)
    expected = hf_sparse.from_pretrained(folder).state_dict()
    model = _sparse_model(seed=1)  # other weights: a mix of old and new files would show
    failure(monkeypatch, model)
    with pytest.raises(Failure):
        hf_sparse.save_pretrained(model, folder, compact=compact, config=SparsityConfig())
    monkeypatch.undo()
    after = _snapshot(folder)
    assert {name: after.get(name) for name in before} == before  # every file the user had, byte-identical
    loaded = hf_sparse.from_pretrained(folder).state_dict()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_masks_file_is_never_half_written(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import hf_sparse.callback as callback_module

    model = _sparse_model()
    callback = SparsityCallback()
    state, control = TrainerState(max_steps=4), TrainerControl()
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    callback.on_train_begin(args, state, control, model=model)
    folder = tmp_path / "checkpoint-0"
    folder.mkdir()
    callback.on_save(args, state, control)
    before = (folder / MASKS_NAME).read_bytes()

    def fail(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise Failure("disk full")

    monkeypatch.setattr(callback_module, "save_file", fail)
    with pytest.raises(Failure):
        callback.on_save(args, state, control)  # saving the same checkpoint again (a resumed run) fails
    assert (folder / MASKS_NAME).read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [MASKS_NAME]


# -- the Hub ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_stored_token(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


@pytest.mark.parametrize("token", [None, False], ids=["none-found", "token-false"])
def test_a_missing_token_is_reported_as_missing_before_any_request(hub, saved, no_stored_token, token):  # noqa: F811
    with pytest.raises(HubPushError, match=r"cannot push to alice/x: no Hugging Face token was found") as err:
        hf_sparse.push_to_hub(saved / "dense", "alice/x", token=token, endpoint=hub.url)
    assert "401" not in str(err.value) and hub.requests == []


def test_a_wrong_token_is_still_reported_as_rejected(hub, saved):  # noqa: F811
    with pytest.raises(HubPushError, match=re.escape("the Hub rejected the token (401)")):
        hf_sparse.push_to_hub(saved / "dense", "alice/x", token="hf_wrong", endpoint=hub.url)


@pytest.mark.parametrize(
    "repo_id", ["alice/bad name", "alice/--x", "alice/x..y", "alice/x" + "y" * 100, "a/b/c", "", "alice/"]
)
def test_an_invalid_repo_id_is_refused_before_any_request(hub, saved, repo_id):  # noqa: F811
    with pytest.raises(ValueError, match=re.escape(repr(repo_id))) as err:
        hf_sparse.push_to_hub(saved / "dense", repo_id, token=GOOD, endpoint=hub.url)
    assert "could not be reached" not in str(err.value) and hub.requests == []


def test_offline_mode_is_named_and_nothing_is_saved(hub, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match=r"HF_HUB_OFFLINE=1 is set, so no request was sent and nothing was saved"):
        hf_sparse.push_to_hub(_sparse_model(), "alice/x", token=GOOD, endpoint=hub.url,
                              save_directory=tmp_path / "out")  # fmt: skip
    assert hub.requests == [] and not (tmp_path / "out").exists()


def test_failed_compact_push_of_a_trainer_keeps_output_dir_as_saved(hub, tmp_path):  # noqa: F811
    trainer = _train(tmp_path)
    closed = FakeHub()  # nothing listens on its port once closed
    url = closed.url
    closed.server_close()
    with pytest.raises(HubPushError, match="could not be reached") as err:
        hf_sparse.push_to_hub(trainer, "alice/compact", token=GOOD, endpoint=url, compact=True)
    output_dir = Path(trainer.args.output_dir)
    assert (output_dir / "model.safetensors").is_file()  # the standard checkpoint the Trainer saved is still there
    hf_sparse.from_pretrained(output_dir)
    kept = Path(str(err.value).split("The local checkpoint in ")[1].split(" is intact")[0])
    assert kept != output_dir and (kept / checkpoint.COMPACT_WEIGHTS_NAME).is_file()
    hf_sparse.from_pretrained(kept)
    shutil.rmtree(kept)
