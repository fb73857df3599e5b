import json

import pytest
from transformers import BertConfig, BertModel

from benchmarks import criterion_time
from benchmarks.criterion_time import criterion_settings, time_criteria, time_layer


def test_sparsegpt_options_are_suffixes_of_the_criterion():
    assert criterion_settings("wanda") == {"criterion": "wanda"}
    assert criterion_settings("sparsegpt+bias+admm", admm_steps=12) == {
        "criterion": "sparsegpt",
        "sparsegpt_update_bias": True,
        "sparsegpt_admm_steps": 12,
    }
    with pytest.raises(ValueError, match=r"'sparsegpt\+refitt'.*sparsegpt\+refit"):
        criterion_settings("sparsegpt+refitt")
    with pytest.raises(ValueError, match=r"'wanda\+bias'"):
        criterion_settings("wanda+bias")


def test_each_timed_run_prunes_with_its_own_options(monkeypatch):
    seen = []

    def prune(model, config, data, device=None):
        seen.append(
            (config.criterion, config.sparsegpt_refit, config.sparsegpt_admm_steps, config.calibration_samples)
        )

    monkeypatch.setattr(criterion_time, "prune_", prune)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    seconds = time_criteria(
        model, [], ("magnitude", "sparsegpt+refit", "sparsegpt+admm"), admm_steps=5, calibration_samples=4
    )
    assert list(seconds) == ["magnitude", "sparsegpt+refit", "sparsegpt+admm"]
    assert seen == [("magnitude", False, 0, 4), ("sparsegpt", True, 0, 4), ("sparsegpt", False, 5, 4)]


def test_layers_are_timed_for_every_variant_and_written(tmp_path, capsys):
    seconds = time_layer(16, 32, ("sparsegpt", "sparsegpt+bias+refit"), tokens=64, admm_steps=3)
    assert set(seconds) == {"sparsegpt", "sparsegpt+bias+refit"} and all(s > 0 for s in seconds.values())
    with pytest.raises(ValueError, match="'wanda'"):
        time_layer(16, 32, ("wanda",), tokens=64)
    out = tmp_path / "t.json"
    criterion_time.main(
        [
            "--device",
            "cpu",
            "--layers",
            "8x16",
            "16x8",
            "--tokens",
            "32",
            "--admm-steps",
            "3",
            "--refit-method",
            "cg",
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "8x16: sparsegpt" in printed and "sparsegpt+admm" in printed
    result = json.loads(out.read_text())
    assert set(result["layers"]) == {"8x16", "16x8"} and (result["admm_steps"], result["refit_method"]) == (3, "cg")
    for bad in ("4096by4096", "0x16", "8x10"):
        with pytest.raises(SystemExit):
            criterion_time.main(["--layers", bad])
        assert "OUTxIN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        criterion_time.main(["--refit-method", "cg"])
    assert "add --layers" in capsys.readouterr().err


def test_the_model_run_times_the_options_on_a_bert(capsys, monkeypatch):
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    monkeypatch.setattr(criterion_time, "bert_base", lambda device: BertModel(config, add_pooling_layer=False).eval())
    argv = "--device cpu --samples 2 --seq-len 8 --batch-size 2 --criteria magnitude,sparsegpt+bias+admm"
    result = criterion_time.main([*argv.split(), "--admm-steps", "3"])
    assert set(result["seconds"]) == {"magnitude", "sparsegpt+bias+admm"}
    assert "sparsegpt+bias+admm" in capsys.readouterr().out
    monkeypatch.setattr(criterion_time, "bert_base", None)  # a misspelt criterion fails before any model is built
    with pytest.raises(ValueError, match="sparsegpt\\+bais"):
        criterion_time.main(["--device", "cpu", "--criteria", "magnitude,sparsegpt+bais"])
    with pytest.raises(ValueError, match="wandaa"):
        criterion_time.main(["--device", "cpu", "--criteria", "magnitude,wandaa"])
