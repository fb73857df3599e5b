"""recipes/squad_24.py: the embedded offline default end to end (one process and two), presets, config files,
the offline error, and resuming a finished run."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
from transformers import AutoModelForQuestionAnswering

from hf_sparse.masks import is_nm
from tests.conftest import HANG_TIMEOUT, REPO, subprocess_env

RECIPE = REPO / "recipes" / "squad_24.py"
SHORT = ["--max_steps", "60", "--recovery_max_steps", "20", "--synthetic_train_paragraphs", "200",
         "--synthetic_eval_paragraphs", "40", "--disable_tqdm", "true"]  # fmt: skip


def load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("squad_24", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["squad_24"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run(args, launcher=(sys.executable,), **env):
    result = subprocess.run(
        [*launcher, str(RECIPE), *args], env={**subprocess_env(), **env}, capture_output=True, text=True,
        timeout=HANG_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def check_report(output_dir, min_dense_f1):
    report = json.loads((output_dir / "report.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"dense", "pruned", "sparse"}
    for stage in stages.values():
        assert 0.0 <= stage["exact_match"] <= stage["f1"] <= 100.0
    assert stages["dense"]["f1"] >= min_dense_f1  # learned the synthetic facts, well above chance
    assert stages["pruned"]["sparsity"] == stages["sparse"]["sparsity"] == 0.5
    assert stages["sparse"]["all_layers_exact"] is True
    assert "no CUDA GPU" in report["skipped"]["swap and timing"]
    assert report["environment"]["torch"] and report["data"]["eval_questions"] > 0
    markdown = (output_dir / "report.md").read_text()
    assert "| F1 |" in markdown and "2:4, zero-shot" in markdown and "swap and timing" in markdown
    assert (output_dir / "f1_by_stage.png").read_bytes()[:4] == b"\x89PNG"
    # The sparse checkpoint: plain from_pretrained, exact 2:4, metadata, and a card with the measured F1.
    model = AutoModelForQuestionAnswering.from_pretrained(output_dir / "sparse")
    layers = model.config.sparsity["layers"]
    assert len(layers) == 12 and all(is_nm(model.get_submodule(name).weight) for name in layers)
    card = (output_dir / "sparse" / "README.md").read_text()
    assert f"{stages['sparse']['f1']:.2f}" in card and "recipes/squad_24.py" in card
    # How long each trained, in the report and the card (the offline default recovers 300 steps after 1200 dense).
    note = f"fine-tuned for {stages['dense']['train_steps']} optimizer steps"
    assert note in markdown and note in card and f"recovered for {stages['sparse']['train_steps']}." in card
    return report


@pytest.mark.slow
def test_embedded_default_runs_offline_and_reports_every_stage(tmp_path):
    result = run(["--output_dir", str(tmp_path), "--disable_tqdm", "true"], OMP_NUM_THREADS="2")
    report = check_report(tmp_path, min_dense_f1=50.0)
    assert report["environment"]["torch_threads"] == 1  # offline.yaml's cpu_threads, over OMP_NUM_THREADS
    assert (report["stages"]["dense"]["train_steps"], report["stages"]["sparse"]["train_steps"]) == (1200, 300)
    assert "different lengths" in (tmp_path / "report.md").read_text()
    check_console(result)


def check_console(result):
    """A first run's console: one banner per stage, in order, each table once, no warning twice."""
    out = result.stdout + result.stderr
    banners = [line for line in result.stdout.splitlines() if line.startswith("Stage ")]
    assert [b.split(":")[0] for b in banners] == [f"Stage {i}/5" for i in range(1, 6)], banners
    assert result.stdout.count("## Stages") == 1  # the report's table
    assert out.count("layer  ") == 1  # the per-layer sparsity table (hf_sparse.masks.format_report), at the end
    assert "pin_memory" not in out
    warnings = [line for line in out.splitlines() if "Warning:" in line or " WARNING " in line]
    assert len(warnings) == len(set(warnings)), warnings


def _launch(config):
    # A free port: the default 29500 may be taken by another job's processes on a shared machine.
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / config),
            "--main_process_port", "0")  # fmt: skip


@pytest.mark.parametrize(
    "config, processes",
    [
        ("accelerate_cpu.yaml", 2),
        ("accelerate_gpu.yaml", 1),
        ("accelerate_ddp.yaml", 2),
        ("accelerate_fsdp.yaml", 2),
        ("accelerate_fsdp_llm.yaml", 2),
    ],
)
def test_each_accelerate_config_starts_its_number_of_processes(tmp_path, config, processes):
    script = tmp_path / "ranks.py"  # one file per process (their prints to one pipe can interleave)
    script.write_text("import os, sys, uuid\nrank, size = os.environ.get('RANK'), os.environ.get('WORLD_SIZE')\n"
                      "open(os.path.join(sys.argv[1], uuid.uuid4().hex), 'w').write(f'rank {rank} of {size}')\n")  # fmt: skip
    out = tmp_path / "ranks"
    out.mkdir()
    result = subprocess.run([*_launch(config), str(script), str(out)], env=subprocess_env(), capture_output=True,
                            text=True, timeout=HANG_TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(path.read_text() for path in out.iterdir())
    expected = [f"rank {r} of {processes}" for r in range(processes)] if processes > 1 else ["rank None of None"]
    assert ranks == expected, result.stdout + result.stderr[-2000:]


@pytest.mark.slow
def test_embedded_default_in_two_processes_and_resumed(tmp_path):
    launcher = _launch("accelerate_cpu.yaml")
    result = run(["--output_dir", str(tmp_path), "--use_cpu", "true", *SHORT], launcher=launcher)
    report = check_report(tmp_path, min_dense_f1=10.0)
    assert report["environment"]["processes"] == 2 and len(report["stages"]["pruned"]["mask_digests_by_rank"]) == 2
    assert result.stdout.count("## Stages") == 1  # printed by the main process only
    assert sum(line.startswith("Stage 1/5") for line in result.stdout.splitlines()) == 1
    # The launcher's command, as typed (python -m accelerate.commands.launch reads `accelerate launch`).
    assert (
        report["command"].startswith("accelerate launch --config_file ") and "accelerate_cpu.yaml" in report["command"]
    )
    assert report["command"].endswith(" ".join(SHORT)) and "recipes/squad_24.py" in report["command"]
    # Started again the same way on a finished run, every training stage is skipped and the measurements are kept.
    again = run(["--output_dir", str(tmp_path), "--use_cpu", "true", *SHORT], launcher=launcher)
    assert "already fine-tuned" in again.stderr and "already recovered" in again.stderr
    assert json.loads((tmp_path / "report.json").read_text())["stages"] == report["stages"]


def test_tutorial_preset_and_overrides():
    recipe = load_recipe()
    args, sparsity, training = recipe.parse_args(["--preset", "tutorial", "--output_dir", "/tmp/x"])
    assert (args.model_name_or_path, args.dataset_name, args.max_seq_length) == ("bert-base-cased", "squad", 384)
    assert (training.num_train_epochs, training.learning_rate, training.lr_scheduler_type.value) == (
        1,
        3e-5,
        "constant",
    )
    assert (training.per_device_train_batch_size, training.per_device_eval_batch_size) == (64, 512)
    assert args.timing_batch_sizes == [4, 16, 64, 256] and sparsity.sparsity_pattern == "2:4"
    args, sparsity, training = recipe.parse_args(
        ["--preset", "tutorial", "--learning_rate", "1e-5", "--criterion", "wanda", "--output_dir", "/tmp/x"]
    )
    assert training.learning_rate == 1e-5 and sparsity.criterion == "wanda" and args.model_name_or_path
    with pytest.raises(SystemExit, match="--preset 'nope' is unknown"):
        recipe.parse_args(["--preset", "nope"])


def test_config_file_gives_the_same_arguments_as_the_preset_and_flags_override_it(tmp_path):
    recipe = load_recipe()
    from_file = recipe.parse_args([str(REPO / "recipes" / "tutorial.yaml")])
    from_preset = recipe.parse_args(["--preset", "tutorial", "--output_dir", "runs/squad_24_tutorial"])
    for a, b in zip(from_file, from_preset):
        names = [f.name for f in dataclasses.fields(a) if f.init and f.name != "preset"]
        assert {n: getattr(a, n) for n in names} == {n: getattr(b, n) for n in names}
    args, sparsity, training = recipe.parse_args(
        [str(REPO / "recipes" / "tutorial.yaml"), "--learning_rate", "1e-5", "--criterion", "wanda"]
    )
    assert (training.learning_rate, sparsity.criterion, args.max_seq_length) == (1e-5, "wanda", 384)
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tutorial\n")
    with pytest.raises(SystemExit, match="'preset' cannot be used in a config file"):
        recipe.parse_args([str(bad)])


def test_help_has_a_description_the_defaults_in_effect_and_criterion_choices(capsys):
    recipe = load_recipe()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "The 2:4 workflow of PyTorch's BERT tutorial in one command" in text  # the description
    assert "--criterion {magnitude,wanda,sparsegpt,learned}" in text
    recovery = text[text.index("--recovery-max-steps") : text.index("--distill [DISTILL]   ")]
    assert "(default: 300)" in " ".join(recovery.split())  # offline.yaml's value, which is the default in effect
    with pytest.raises(SystemExit):
        recipe.parse_args(["--preset", "tutorial", "--help"])
    tutorial = capsys.readouterr().out
    recovery = tutorial[tutorial.index("--recovery-max-steps") : tutorial.index("--distill [DISTILL]   ")]
    assert "(default: None)" in " ".join(recovery.split())  # the tutorial recovers as long as it fine-tunes


def test_offline_defaults_come_from_offline_yaml():
    recipe = load_recipe()
    args, sparsity, training = recipe.parse_args([])
    assert (training.max_steps, training.learning_rate, args.recovery_max_steps) == (1200, 1e-3, 300)
    assert (args.max_seq_length, args.doc_stride, training.output_dir) == (48, 16, "runs/squad_24")
    assert args.cpu_threads == 1


def test_tutorial_preset_offline_fails_at_once_saying_what_to_pass(tmp_path):
    env = subprocess_env()
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--preset", "tutorial", "--output_dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT,
    )  # fmt: skip
    # At once: before any stage starts, not after the Hub's retries (what it printed, not how long it took).
    assert result.returncode != 0 and "Stage 1/5" not in result.stdout
    message = result.stderr
    assert "model 'bert-base-cased'" in message and "dataset 'squad'" in message
    assert "--model_name_or_path" in message and "--train_file" in message and "without --preset" in message
    assert not (tmp_path / "dense").exists()


def _tiny_real_model(folder, *files):
    """A tiny BERT stored in fp16 (as many Hub checkpoints are), with a WordPiece vocabulary of the files' words."""
    import re

    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

    from tests.conftest import tiny_bert_config

    words = set()
    for path in files:
        words |= set(re.findall(r"\w+", path.read_text(encoding="utf-8").lower()))
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config: BertConfig = tiny_bert_config(vocab_size=len(vocab), max_position_embeddings=512)
    BertForQuestionAnswering(config).half().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_real_files_and_an_fp16_model_with_no_further_flags(tmp_path):
    from tests.conftest import shared_data

    train, dev = shared_data("squad", "squad-v2-dev-sample.json"), shared_data("squad", "xquad-en.json")
    model = _tiny_real_model(tmp_path / "model", train, dev)
    out = tmp_path / "run"
    common = ["--model_name_or_path", str(model), "--train_file", str(train), "--validation_file", str(dev),
              "--max_train_samples", "24", "--max_eval_samples", "24", "--disable_tqdm", "true"]  # fmt: skip
    # A window too short for the longest question plus the stride would make the tokenizer panic: refused at once.
    env = subprocess_env()
    bad = subprocess.run([sys.executable, str(RECIPE), *common, "--max_seq_length", "24", "--doc_stride", "16",
                          "--output_dir", str(out)], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "Raise --max_seq_length" in bad.stderr, bad.stderr[-2000:]
    assert not (out / "dense").exists()
    run([*common, "--max_steps", "3", "--output_dir", str(out)])
    report = json.loads((out / "report.json").read_text())
    arguments = report["arguments"]
    assert (arguments["recipe"]["max_seq_length"], arguments["recipe"]["doc_stride"]) == (384, 128)
    assert arguments["sparsity"]["criterion"] == "sparsegpt"
    assert report["data"]["longest_question_tokens"] > 10
    # 11 of the 24 questions have no answer: never trained on as answers, fed to the distillation only
    assert report["data"]["train_questions"] == 13 and report["data"]["unanswerable_train_questions"] == 11
    assert report["data"]["distillation_only_features"] >= 11
    data = report["data"]
    assert (
        report["stages"]["sparse"]["recovery_features"] == data["train_features"] + data["distillation_only_features"]
    )
    stages = report["stages"]
    for stage in ("dense", "pruned", "sparse"):
        assert 0.0 <= stages[stage]["exact_match"] <= stages[stage]["f1"] <= 100.0
    assert all(v is not None and v == v for v in (stages["dense"]["train_loss"], stages["sparse"]["train_loss"]))
    # fp32 master weights from the fp16 checkpoint, and the masks named by the criterion that chose them.
    saved = json.loads((out / "sparse" / "config.json").read_text())
    assert saved["sparsity"]["criterion"] == "sparsegpt" and saved["dtype"] == "float32"
    assert saved["sparsity"]["criterion_options"]["sparsegpt_admm_steps"] == 30
    card = (out / "sparse" / "README.md").read_text()
    chosen = re.search(r"Masks were chosen by `sparsegpt` \(([^)]*)\)", card)
    used = stages["pruned"]["calibration_samples"]  # every training feature: fewer than the 128 asked for
    assert used == data["train_features"] < 128
    assert chosen and {f"calibration_samples={used}", "sparsegpt_update_bias=True", "sparsegpt_admm_steps=30"} <= set(
        chosen.group(1).split(", ")
    ), card


def test_real_data_defaults_apply_only_to_real_data():
    recipe = load_recipe()
    args, sparsity, training = recipe.parse_args(["--model_name_or_path", "m", "--train_file", "t"])
    assert (args.max_seq_length, args.doc_stride, sparsity.criterion, args.distill) == (384, 128, "sparsegpt", True)
    assert (training.learning_rate, training.num_train_epochs, args.recovery_learning_rate) == (2e-4, 20, 1.5e-4)
    assert args.distill_hidden_weight == 10.0
    assert (sparsity.sparsegpt_update_bias, sparsity.sparsegpt_admm_steps) == (True, 30)
    args, sparsity, training = recipe.parse_args([])
    assert (sparsity.sparsegpt_update_bias, sparsity.sparsegpt_admm_steps) == (False, 0)
    assert (args.max_seq_length, args.doc_stride, sparsity.criterion, args.distill) == (48, 16, "magnitude", False)


def test_a_run_recorded_before_an_argument_existed_continues_as_that_arguments_default(tmp_path):
    recipe = load_recipe()
    args, sparsity, training = recipe.parse_args(["--output_dir", str(tmp_path)])
    recorded = recipe.PLAN.record("sparse", (args, sparsity, training))
    older = {k: v for k, v in recorded.items() if k != "distill_unanswerable"}  # before the flag existed
    report = {"stages": {"sparse": {"f1": 80.0}}, "stage_arguments": {"sparse": older}}
    recipe.PLAN.check(report, (args, sparsity, training), tmp_path)  # continues
    args.distill_unanswerable = False
    with pytest.raises(SystemExit, match="--distill_unanswerable True -> False"):
        recipe.PLAN.check(report, (args, sparsity, training), tmp_path)


def test_a_config_file_goes_over_the_preset_and_flags_over_both(tmp_path):
    recipe = load_recipe()
    config = tmp_path / "mine.yaml"
    config.write_text("learning_rate: 1.0e-5\nmax_seq_length: 256\ncriterion: wanda\n")
    args, sparsity, training = recipe.parse_args([str(config), "--preset", "tutorial", "--max_seq_length", "128"])
    assert (training.learning_rate, sparsity.criterion, args.max_seq_length) == (1e-5, "wanda", 128)  # file, flag
    assert (args.model_name_or_path, training.per_device_train_batch_size) == ("bert-base-cased", 64)  # preset
    args, sparsity, training = recipe.parse_args([str(config), "--preset=tutorial"])
    assert (training.learning_rate, args.max_seq_length, args.dataset_name) == (1e-5, 256, "squad")


def test_dataset_name_synthetic_keeps_the_offline_defaults():
    recipe = load_recipe()
    offline = recipe.parse_args([])
    for flags in (["--dataset_name", "synthetic"], ["--dataset_name=synthetic"], ["--dataset-name", "synthetic"]):
        assert recipe.parse_args(flags) == offline, flags
    args, sparsity, _ = recipe.parse_args(["--dataset_name", "squad"])
    assert (args.max_seq_length, sparsity.criterion) == (384, "sparsegpt")  # real data: recipes/real.yaml


BAD_CONFIGS = {
    "misspelt-key": ("max_step: 10\n", "unknown key 'max_step': did you mean 'max_steps'"),
    "unknown-key": ("zzz_nothing: 1\n", "unknown key 'zzz_nothing': it is no argument of the recipe"),
    "bad-number": ("learning_rate: fast\n", "learning_rate: 'fast' is not a valid value"),
    "bad-choice": ("criterion: l1\n", "criterion: 'l1' is not one of ['magnitude', 'wanda', 'sparsegpt', 'learned']"),
    "bad-list": ("timing_batch_sizes: [4, many]\n", "timing_batch_sizes: 'many' is not a valid value"),
}


@pytest.mark.parametrize("text, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_a_bad_config_file_is_refused_naming_the_file_and_the_key(tmp_path, text, message):
    recipe = load_recipe()
    config = tmp_path / "mine.yaml"
    config.write_text(f"learning_rate: 1.0e-5\n{text}")
    with pytest.raises(SystemExit) as err:
        recipe.parse_args([str(config)])
    assert str(err.value).startswith(f"{config}: ") and message in str(err.value), str(err.value)


def test_the_recovery_follows_a_dense_length_given_without_its_own():
    recipe = load_recipe()
    assert recipe.parse_args([])[0].recovery_max_steps == 300  # offline.yaml: 1200 dense, 300 recovery
    args, _, training = recipe.parse_args(["--max_steps", "20"])
    assert (training.max_steps, args.recovery_max_steps, args.recovery_num_train_epochs) == (20, None, None)
    assert recipe.parse_args(["--max_steps", "20", "--recovery_max_steps", "5"])[0].recovery_max_steps == 5
    args, _, training = recipe.parse_args(["--model_name_or_path", "m", "--num_train_epochs", "2"])  # real.yaml
    assert (training.num_train_epochs, args.recovery_num_train_epochs) == (2, None)


def test_linked_lengths_follow_through_preset_and_config_file(tmp_path):
    from transformers import TrainingArguments

    from hf_sparse.parser import RecipeParser

    recipe = load_recipe()
    preset, config = tmp_path / "preset.yaml", tmp_path / "mine.yaml"
    preset.write_text("max_steps: 100\nrecovery_max_steps: 30\nlearning_rate: 1.0e-4\n")
    config.write_text("max_steps: 10\n")
    parser = RecipeParser((recipe.RecipeArguments, TrainingArguments), presets={"p": preset},
                          default_file=lambda given: preset, linked=[(("max_steps",), ("recovery_max_steps",))])  # fmt: skip
    args, training = parser.parse([str(config), "--preset", "p"])
    assert (training.max_steps, args.recovery_max_steps, training.learning_rate) == (10, None, 1e-4)
