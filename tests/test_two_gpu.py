"""Two-GPU checks (NCCL): 2:4 recovery training with Wanda masks and distillation under DDP and FSDP2 on a
BERT-base-sized model. Skipped where fewer than two CUDA GPUs exist; the full check with the recipe, the
single-GPU evaluation, the resume and the throughput table is `python tests/scripts/two_gpu_check.py OUT`."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from tests.conftest import HANG_TIMEOUT, REPO, subprocess_env

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason=f"needs two CUDA GPUs; found {torch.cuda.device_count()}"
)
SCRIPT = REPO / "tests" / "scripts" / "train_throughput.py"


def launch(config: str, out, *args) -> list[dict]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / config),
               str(SCRIPT), str(out), "--steps", "20", "--warmup", "5", *args]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_ranks_hold_rank_0_masks_and_end_exactly_2_4(tmp_path):
    ranks = launch("accelerate_ddp.yaml", tmp_path)
    assert ranks[0]["mask_digest_step1"] == ranks[1]["mask_digest_step1"]
    assert all(r["final_weights_2_4"] and r["layers"] == 72 for r in ranks)


def test_fsdp2_shards_the_teacher_and_ends_exactly_2_4(tmp_path):
    ranks = launch("accelerate_fsdp.yaml", tmp_path, "--teacher", "sharded")
    assert all(r["teacher_sharded"] and r["final_weights_2_4"] for r in ranks)
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, intermediate_size=3072)  # fmt: skip
    full = sum(p.numel() * p.element_size() for p in BertForQuestionAnswering(config).parameters())
    assert all(r["teacher_bytes_on_rank"] <= 0.51 * full for r in ranks)  # half of the teacher on each rank


def test_fsdp2_llm_recipe_prunes_the_same_masks_on_both_ranks_and_saves_an_exact_2_4_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_sparse.masks import is_nm

    recipe = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "recipes" / "accelerate_fsdp_llm.yaml"), "--main_process_port", "0",
              str(REPO / "recipes" / "llm_24.py"), "--output_dir", str(tmp_path), "--bf16", "true",
              "--config_overrides", "hidden_size=256,intermediate_size=512,num_attention_heads=4",
              "--dense_max_steps", "20", "--max_steps", "10", "--calibration_samples", "8", "--disable_tqdm", "true",
              "--criterion", "sparsegpt", "--sparsegpt_admm_steps", "5"]  # fmt: skip
    result = subprocess.run(recipe, env=subprocess_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    digests = report["stages"]["pruned"]["mask_digests_by_rank"]
    assert report["environment"]["processes"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert report["stages"]["sparse"]["all_layers_exact"] is True
    sparse = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    projections = [m.weight for n, m in sparse.named_modules() if n.endswith("_proj") and hasattr(m, "weight")]
    assert len(projections) == 14 and all(is_nm(w, 2, 4) for w in projections)
