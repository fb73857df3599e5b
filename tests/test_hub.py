"""Pushing sparse checkpoints to a fake Hub: a local HTTP server implementing the endpoints an upload uses."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load
from transformers import BertForQuestionAnswering, Trainer, TrainingArguments

import hf_sparse
from hf_sparse import SparsityCallback, SparsityConfig, prune_
from hf_sparse.hub import HubPushError
from tests.conftest import HANG_TIMEOUT, RandomQADataset, subprocess_env, tiny_bert_config

GOOD, READ_ONLY = "hf_good_write_token", "hf_read_only_token"


class FakeHub(ThreadingHTTPServer):
    """Answers create_repo, create_branch, validate-yaml, preupload ("regular" upload mode, so file contents come
    inline in the commit) and commit, and records what arrives."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict] = {}
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("X-Error-Message", body.get("error", ""))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        self._reply(404, {"error": f"fake hub: no GET {self.path}"})

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        self.server.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in (GOOD, READ_ONLY):
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/validate-yaml":
            return self._reply(200, {})
        if token == READ_ONLY:
            return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = (
                f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            )
            # huggingface_hub 2.x sends "visibility", 1.x "private".
            private = payload.get("private", payload.get("visibility") == "private")
            self.server.repos.setdefault(repo_id, dict(payload, private=bool(private)))
            return self._reply(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": "0"})
        parts = path.split("/")  # /api/models/{ns}/{name}/{action}/{revision}
        if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
            repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
            if repo_id not in self.server.repos:
                return self._reply(404, {"error": "Repository not found"})
            if action == "branch":
                self.server.branches.append((repo_id, revision))
                return self._reply(200, {})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._reply(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {
                    item["value"]["path"]: base64.b64decode(item["value"]["content"])
                    for item in lines
                    if item["key"] == "file"
                }
                header = next(item["value"] for item in lines if item["key"] == "header")
                self.server.commits.append(
                    {"repo_id": repo_id, "revision": revision, "summary": header["summary"], "files": files}
                )
                oid = hashlib.sha1(body).hexdigest()
                return self._reply(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{oid}", "commitOid": oid})
        return self._reply(404, {"error": f"fake hub: no POST {path}"})


def online(monkeypatch) -> None:
    """The fake Hub is on this machine, so the tests push to it whatever the user's HF_HUB_OFFLINE says.
    huggingface_hub reads the variable once, at import, hence the constant as well."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token of the machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    online(monkeypatch)
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    prune_(model)
    folder = tmp_path / "ckpt"
    hf_sparse.save_pretrained(model, folder, config=SparsityConfig())
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_folder_uploads_checkpoint_metadata_and_card(hub, checkpoint):
    before = _snapshot(checkpoint)
    info = hf_sparse.push_to_hub(
        checkpoint,
        "alice/tiny-bert-2of4",
        token=GOOD,
        private=True,
        revision="sparse-v1",
        endpoint=hub.url,
        dataset="rajpurkar/squad",
        metrics={"sparse": {"exact_match": 12.5, "f1": 20.25}},
        command="python train.py --sparsity 2:4",
    )
    assert hub.repos["alice/tiny-bert-2of4"]["private"] is True
    assert hub.branches == [("alice/tiny-bert-2of4", "sparse-v1")]
    (commit,) = hub.commits
    assert commit["revision"] == "sparse-v1"
    assert info.oid and info.commit_url.endswith(info.oid)
    assert sorted(commit["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert commit["files"]["config.json"] == before["config.json"]
    assert commit["files"]["model.safetensors"] == before["model.safetensors"]
    uploaded = load(commit["files"]["model.safetensors"])
    meta = json.loads(commit["files"]["config.json"])["sparsity"]
    for name in meta["layers"]:
        assert hf_sparse.masks.is_nm(uploaded[f"{name}.weight"])
    card = ModelCard(commit["files"]["README.md"].decode())
    assert "hf-sparse" in card.data.tags
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("exact_match", 12.5), ("f1", 20.25)]
    assert 'hf_sparse.from_pretrained("alice/tiny-bert-2of4", fast=True)' in card.text
    assert "python train.py --sparsity 2:4" in card.text
    assert _snapshot(checkpoint) == before  # the card went up without being written into the folder


def test_push_model_compact_uploads_compact_file(hub, tmp_path):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    prune_(model)
    hf_sparse.checkpoint.attach_sparsity_metadata(model, SparsityConfig())
    hf_sparse.push_to_hub(
        model, "alice/compact", token=GOOD, endpoint=hub.url, compact=True, save_directory=tmp_path / "c"
    )
    (commit,) = hub.commits
    assert sorted(commit["files"]) == ["README.md", "config.json", "hf_sparse_model.safetensors"]
    assert hub.repos["alice/compact"]["private"] is False
    assert commit["revision"] == "main"
    assert "compact format" in commit["files"]["README.md"].decode()


@pytest.mark.parametrize(
    "token,expected",
    [("hf_wrong", r"rejected the token \(401\)"), (READ_ONLY, r"no write access to alice/denied \(403\)")],
)
def test_hub_errors_are_clear_and_keep_the_checkpoint(hub, checkpoint, token, expected):
    before = _snapshot(checkpoint)
    with pytest.raises(HubPushError, match=expected) as err:
        hf_sparse.push_to_hub(checkpoint, "alice/denied", token=token, endpoint=hub.url)
    assert f"The local checkpoint in {checkpoint} is intact" in str(err.value)
    assert _snapshot(checkpoint) == before
    assert hub.commits == []


def test_unreachable_hub_is_reported_and_a_temporary_save_is_kept(hub, tmp_path):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    prune_(model)
    hf_sparse.checkpoint.attach_sparsity_metadata(model, SparsityConfig())
    closed = FakeHub()  # bind a free port, then close it: nothing listens there
    url = closed.url
    closed.server_close()
    with pytest.raises(HubPushError, match=r"could not be reached") as err:
        hf_sparse.push_to_hub(model, "alice/offline", token=GOOD, endpoint=url)
    kept = Path(str(err.value).split("The local checkpoint in ")[1].split(" is intact")[0])
    assert hf_sparse.from_pretrained(kept).config.sparsity["layers"] == model.config.sparsity["layers"]


def test_bad_repo_id_and_broken_checkpoint_are_refused_before_upload(hub, checkpoint):
    with pytest.raises(ValueError, match="repo_id must be 'namespace/name'"):
        hf_sparse.push_to_hub(checkpoint, "no-namespace", token=GOOD, endpoint=hub.url)
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 20)
    with pytest.raises(hf_sparse.checkpoint.SparseCheckpointError, match="truncated or damaged"):
        hf_sparse.push_to_hub(checkpoint, "alice/x", token=GOOD, endpoint=hub.url)
    assert hub.requests == []


def _train(tmp_path, **hub_args):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **hub_args,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomQADataset(16), callbacks=[SparsityCallback()])
    trainer.train()
    return trainer


def test_push_trainer_uses_its_hub_arguments(hub, tmp_path):
    trainer = _train(tmp_path, hub_model_id="bob/from-trainer", hub_token=GOOD, hub_private_repo=True)
    hf_sparse.push_to_hub(trainer, endpoint=hub.url, dataset="rajpurkar/squad")
    (commit,) = hub.commits
    assert commit["repo_id"] == "bob/from-trainer" and hub.repos["bob/from-trainer"]["private"] is True
    assert {"README.md", "config.json", "model.safetensors", "training_args.bin"} <= set(commit["files"])
    meta = json.loads(commit["files"]["config.json"])["sparsity"]
    assert meta["total_sparsity"] == 0.5 and len(meta["layers"]) == 12
    assert "## Sparsity" in commit["files"]["README.md"].decode()


TRAINER_PUSH = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, "tests")
    from conftest import RandomQADataset, tiny_bert_config
    from transformers import BertForQuestionAnswering, Trainer, TrainingArguments
    from hf_sparse import SparsityCallback

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=8, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, push_to_hub=True,
                             hub_model_id="carol/trainer-push", hub_token=sys.argv[2])
    model = BertForQuestionAnswering(tiny_bert_config())
    trainer = Trainer(model=model, args=args, train_dataset=RandomQADataset(16), callbacks=[SparsityCallback()])
    trainer.train()
    trainer.push_to_hub()
    """
)


@pytest.mark.slow
def test_trainers_own_push_carries_checkpoint_metadata_and_tags(hub, tmp_path):
    """`TrainingArguments(push_to_hub=True)` + `trainer.push_to_hub()`: the Trainer writes and uploads its own
    README (its card), which carries hf-sparse's tags; the sparsity metadata travels in config.json."""
    env = subprocess_env()
    env["HF_ENDPOINT"] = hub.url  # read by huggingface_hub at import time, hence a child process
    env.pop("HF_HUB_OFFLINE", None)
    env["HF_HOME"] = str(tmp_path / "hf_home")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", TRAINER_PUSH, str(out), GOOD],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    commit = hub.commits[-1]
    assert commit["repo_id"] == "carol/trainer-push"
    meta = json.loads(commit["files"]["config.json"])["sparsity"]
    assert meta["sparsity_pattern"] == "2:4" and meta["total_sparsity"] == 0.5
    weights = load(commit["files"]["model.safetensors"])
    assert all(hf_sparse.masks.is_nm(weights[f"{name}.weight"]) for name in meta["layers"])
    card = ModelCard(commit["files"]["README.md"].decode())
    assert {"hf-sparse", "2:4-sparsity"} <= set(card.data.tags)


def test_launcher_command_is_recorded_as_typed():
    from hf_sparse.hub import launcher_command

    accelerate = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "recipes/squad_24.py"]
    assert launcher_command([["python", "recipes/squad_24.py"], accelerate]) == (
        "accelerate launch --num_processes 2 recipes/squad_24.py"
    )
    assert launcher_command([["python3", "-m", "accelerate.commands.launch", "--cpu", "r.py", "--x", "a b"]]) == (
        "accelerate launch --cpu r.py --x 'a b'"
    )
    assert launcher_command([["/venv/bin/torchrun", "--nproc_per_node", "2", "r.py"]]) == (
        "torchrun --nproc_per_node 2 r.py"
    )
    assert launcher_command([["bash"], ["/venv/bin/accelerate", "config"]]) is None
