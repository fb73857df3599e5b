"""recipes/llm_24.py: the offline default end to end (a tiny Llama trained on synthetic facts, SparseGPT 2:4, data-free
distillation), its report, checkpoint and card; a rerun that skips what is done; reruns with other arguments refused;
recovery on the user's text; inputs that cannot work refused before anything runs; and the generate() timing's report
table on numbers measured here."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_sparse.inference import semi_structured_support
from hf_sparse.masks import is_nm
from tests.conftest import HANG_TIMEOUT, REPO, subprocess_env

RECIPE = REPO / "recipes" / "llm_24.py"
# The offline default, shortened: the dense model still learns the facts well above chance (25%)
SHORT = ["--dense_max_steps", "150", "--max_steps", "20", "--synthetic_train_paragraphs", "200",
         "--synthetic_eval_paragraphs", "20", "--recovery_prompts", "32", "--recovery_new_tokens", "16",
         "--eval_questions", "40", "--disable_tqdm", "true"]  # fmt: skip
TINY = ["--dense_max_steps", "4", "--max_steps", "2", "--synthetic_train_paragraphs", "12",
        "--synthetic_eval_paragraphs", "4", "--recovery_prompts", "4", "--recovery_new_tokens", "4",
        "--calibration_samples", "4", "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("llm_24", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["llm_24"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run(output_dir, *flags):
    result = subprocess.run([sys.executable, str(RECIPE), "--output_dir", str(output_dir), *SHORT, *flags],
                            env=subprocess_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("llm_24")
    return output_dir, run(output_dir)


def test_the_offline_default_reports_every_stage_and_saves_an_exact_2_4_checkpoint_with_its_card(finished):
    output_dir, _ = finished
    report = json.loads((output_dir / "report.json").read_text())
    stages = report["stages"]
    kernels = semi_structured_support("cuda", torch.float16)  # None on a GPU with 2:4 kernels
    assert set(stages) == {"dense", "pruned", "sparse"} | ({"swapped"} if kernels is None else set())
    for stage in stages.values():
        assert stage["perplexity"] >= 1.0 and stage["perplexity_texts"] == 20 and stage["max_length"] == 192
        assert stage["questions"] == 40 and stage["choices"] == 4
        assert 0.0 <= stage["answer_choice_accuracy"] <= 100.0
    assert stages["dense"]["answer_choice_accuracy"] >= 35.0  # learned some facts: chance is 25 (300 steps: ~77)
    assert stages["dense"]["train_steps"] == 150 and stages["sparse"]["train_steps"] == 20
    # SparseGPT (the default), calibrated on the training paragraphs; pruning costs the tiny model perplexity
    assert stages["pruned"]["calibration_samples"] == 64 and stages["pruned"]["layers"] == 14
    assert stages["pruned"]["perplexity"] > stages["dense"]["perplexity"]
    assert stages["pruned"]["sparsity"] == stages["sparse"]["sparsity"] == 0.5
    assert stages["sparse"]["all_layers_exact"] is True and stages["sparse"]["recovery_rows"] == 32
    assert "data-free" in stages["sparse"]["recovery_data"] and stages["sparse"]["recovery_labelled_tokens"] > 0
    if kernels is None:  # GPU: the swapped model is measured, and generate() timed at each batch size
        assert stages["swapped"]["perplexity"] == pytest.approx(stages["sparse"]["perplexity"], rel=0.02)
        assert [r["batch_size"] for r in report["generation"]["rows"]] == [1, 16]
        assert (output_dir / "generation.png").is_file() and "## Generation" in (output_dir / "report.md").read_text()
    else:
        assert kernels in report["skipped"]["sparse kernels and generate() timing"]
    markdown = (output_dir / "report.md").read_text()
    assert f"| perplexity | {stages['dense']['perplexity']:.2f} | {stages['sparse']['perplexity']:.2f} |" in markdown
    assert "| 2:4, zero-shot (pruned, no training) |" in markdown and "distilled from it for 20" in markdown
    assert (output_dir / "metrics_by_stage.png").read_bytes()[:4] == b"\x89PNG"
    # The checkpoint: plain from_pretrained, every projection exactly 2:4, embeddings and head not pruned
    model = AutoModelForCausalLM.from_pretrained(output_dir / "sparse")
    layers = model.config.sparsity["layers"]
    assert len(layers) == 14 and all(is_nm(model.get_submodule(name).weight) for name in layers)
    assert model.config.sparsity["criterion"] == "sparsegpt"
    assert not is_nm(model.lm_head.weight) and not is_nm(model.model.embed_tokens.weight)
    card = (output_dir / "sparse" / "README.md").read_text()
    for key in ("perplexity", "answer_choice_accuracy", "answer_choice_accuracy_norm"):
        for stage in ("dense", "sparse"):
            assert f"{stages[stage][key]:.2f}" in card
    assert "recipes/llm_24.py" in card and "Perplexity" in card and "20 paragraphs and 40 questions" in card


@pytest.mark.slow
def test_two_processes_prune_the_same_masks_and_save_an_exact_2_4_checkpoint(tmp_path):
    # accelerate runs FSDP only on GPUs (on CPUs its FSDP config falls back to plain data parallelism): the FSDP2
    # logic is tested by the torchrun scripts of test_callback, test_distillation and test_calibration_llm
    config = REPO / "recipes" / "accelerate_cpu.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--main_process_port", "0", str(RECIPE), "--use_cpu", "true", "--output_dir", str(tmp_path), *TINY]  # fmt: skip
    result = subprocess.run(launch, env=subprocess_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    digests = report["stages"]["pruned"]["mask_digests_by_rank"]
    assert report["environment"]["processes"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert report["stages"]["sparse"]["all_layers_exact"] is True and report["stages"]["sparse"]["train_steps"] == 2
    assert result.stdout.count("## Stages") == 1  # the main process reports
    sparse = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    projections = [m.weight for n, m in sparse.named_modules() if n.endswith(("_proj",)) and hasattr(m, "weight")]
    assert len(projections) == 14 and all(is_nm(w, 2, 4) for w in projections)


def test_a_rerun_skips_what_is_done_and_keeps_its_numbers(finished):
    output_dir, _ = finished
    before = json.loads((output_dir / "report.json").read_text())["stages"]
    result = run(output_dir)
    log = result.stdout + result.stderr
    assert "Dense model already trained" in log and "Sparse model already recovered" in log
    assert "perplexity" not in "".join(line for line in log.splitlines() if "INFO llm_24" in line)  # no evaluation
    after = json.loads((output_dir / "report.json").read_text())["stages"]
    assert after == before


@pytest.mark.parametrize(
    "flags, stage",
    [(["--dense_max_steps", "10"], "dense"), (["--max_length", "128"], "dense"),
     (["--criterion", "magnitude"], "pruned"), (["--calibration_samples", "8"], "pruned"),
     (["--max_steps", "5"], "sparse"), (["--learning_rate", "1e-4"], "sparse"),
     (["--distill_hidden_weight", "1.0"], "sparse"), (["--recovery_new_tokens", "8"], "sparse")],
)  # fmt: skip
def test_a_rerun_with_a_result_changing_argument_is_refused_naming_it(recipe, finished, flags, stage):
    output_dir, _ = finished
    report_before = (output_dir / "report.json").read_bytes()
    with pytest.raises(SystemExit) as err:
        recipe.prepare(*recipe.parse_args(["--output_dir", str(output_dir), *SHORT, *flags]))
    message = str(err.value)
    assert f"holds the {stage!r} stage of a run with other arguments" in message and f"{flags[0]} " in message
    assert "--overwrite_output_dir" in message
    assert (output_dir / "report.json").read_bytes() == report_before


def test_the_recovery_distils_on_the_users_text_file(recipe, tmp_path):
    texts = [f"The capital of Zorbia{i} is Quellen{i}." for i in range(6)]
    (tmp_path / "mine.txt").write_text("\n".join(texts) + "\n\n")
    report = recipe.main(["--output_dir", str(tmp_path / "out"), *TINY, "--recovery_text_file",
                          str(tmp_path / "mine.txt")])  # fmt: skip
    sparse = report["stages"]["sparse"]
    assert sparse["recovery_rows"] == 6 and str(tmp_path / "mine.txt") in sparse["recovery_data"]
    assert "generation_seconds" not in sparse and sparse["all_layers_exact"] is True
    # every token after the first of each line is labelled (BOS + bytes of the text)
    assert sparse["recovery_labelled_tokens"] == sum(len(t.encode()) for t in texts)


def _squad(path, articles):
    data = [{"title": f"article {a}", "paragraphs": [{"context": f"Zorbia {a} lies by Quellen {a} and Marvin {a}.",
             "qas": [{"id": f"{a}-{q}", "question": f"Where {q}?", "answers": [{"text": t, "answer_start": s}]}
                     for q, (t, s) in enumerate([(f"Zorbia {a}", 0), (f"Quellen {a}", 17), (f"Marvin {a}", 31)])]}]}
            for a in range(articles)]  # fmt: skip
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


@pytest.mark.parametrize(
    "flags, message",
    [(["--squad_file", "missing.json"], "--squad_file missing.json does not exist"),
     (["--recovery_text_file", "missing.txt"], "--recovery_text_file missing.txt does not exist"),
     (["--eval_articles", "3"], "--eval_articles must be from 1 to 2 (the file has 3 articles)"),
     (["--eval_articles", "1", "--num_choices", "4"], "no evaluation question has 3 other answers in its article"),
     (["--timing_compile_mode", "graphs"], "--timing_compile_mode 'graphs': choose from")],
)  # fmt: skip
def test_inputs_that_cannot_work_are_refused_before_anything_runs(recipe, tmp_path, flags, message):
    squad = _squad(tmp_path / "three.json", 3)
    if "--squad_file" not in flags:
        flags = ["--squad_file", str(squad), *flags]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe.main(["--output_dir", str(tmp_path / "out"), *TINY, *flags])
    assert not (tmp_path / "out" / "dense").exists()


def test_the_smollm2_preset_names_the_packaged_model_and_the_squad_sample(recipe):
    args, sparsity, training_args = recipe.parse_args(["--preset", "smollm2", "--max_steps", "7"])
    assert args.model_name_or_path == recipe.SMOLLM2 and args.squad_file.endswith("squad-v2-dev-sample.json")
    assert (sparsity.criterion, args.max_length, training_args.max_steps) == ("sparsegpt", 512, 7)
    assert (sparsity.sparsegpt_admm_steps, sparsity.calibration_samples) == (30, 128)  # the README's best row
    assert sparsity.sparsegpt_update_bias is False  # a Llama's projections have no bias to update
    default, sparsity, _ = recipe.parse_args([])
    assert default.model_name_or_path is None and sparsity.criterion == "sparsegpt"
    assert (sparsity.sparsegpt_update_bias, sparsity.sparsegpt_admm_steps) == (False, 0)


def test_the_generation_timing_is_reported_as_a_table_plot_and_card_benchmark(tmp_path):
    """The GPU stage's report entry, filled with `generation_speed` measured here on the CPU."""
    from hf_sparse import run_report
    from hf_sparse.lm import byte_tokenizer
    from hf_sparse.lm.generation import generation_speed
    from tests.test_lm_evaluation import tiny_llama

    tokenizer = byte_tokenizer()
    model = tiny_llama(tokenizer)
    speed = generation_speed(model, tokenizer, ["Paris has many bridges. " * 4], batch_size=2, prompt_tokens=16,
                             new_tokens=8, repeats=2)  # fmt: skip
    assert speed.tokens_per_second == pytest.approx(2 * 8 / speed.seconds)
    row = {"batch_size": 2, "prompt_tokens": 16, "new_tokens": 8, "dense_tokens_per_second": speed.tokens_per_second,
           "sparse_tokens_per_second": 2 * speed.tokens_per_second}  # fmt: skip
    report = {"stages": {}, "skipped": {}, "metrics": [], "generation": {"description": "CPU", "rows": [row]}}
    run_report.save_report(report, tmp_path)
    table = run_report.generation_table(report)
    assert table[0]["speed-up"] == "2.00x" and table[0]["prompt + new tokens"] == "16 + 8"
    assert "## Generation" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "generation.png").read_bytes()[:4] == b"\x89PNG"
    card = run_report.card_kwargs(report, tmp_path)
    assert card["benchmark"] == table and card["benchmark_plot"] == str(tmp_path / "generation.png")


@pytest.mark.parametrize(
    "kwargs, named", [({"batch_size": 0}, "batch_size"), ({"prompt_tokens": 500}, "fewer than batch_size x prompt")]
)
def test_generation_speed_names_what_it_cannot_time(kwargs, named):
    from hf_sparse.lm import byte_tokenizer
    from hf_sparse.lm.generation import generation_speed
    from tests.test_lm_evaluation import tiny_llama

    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match=named):
        generation_speed(tiny_llama(tokenizer), tokenizer, ["short text"], **kwargs)


def test_learned_masks_start_from_the_prior_criterion_and_are_held_to_an_exact_2_4_checkpoint(recipe, tmp_path):
    flags = ["--output_dir", str(tmp_path), *TINY, "--criterion", "learned", "--mask_learning_prior", "magnitude",
             "--mask_learning_steps", "3"]  # fmt: skip
    report = recipe.main(flags)
    stages = report["stages"]
    assert stages["pruned"]["layers"] == 14 and stages["pruned"]["sparsity"] == 0.5
    assert stages["sparse"]["all_layers_exact"] is True
    assert "masks learned for 3 steps from magnitude's" in report["training_note"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    assert model.config.sparsity["criterion"] == "learned"
    assert report["stage_arguments"]["pruned"]["mask_learning_steps"] == 3
    with pytest.raises(SystemExit, match="--mask_learning_prior 'learned': choose magnitude, wanda or sparsegpt"):
        recipe.main([*flags[:-4], "--mask_learning_prior", "learned", "--overwrite_output_dir", "true"])
