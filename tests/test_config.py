import pytest

from hf_sparse import SparsityConfig
from hf_sparse.config import parse_pattern


def test_defaults_are_the_tutorials_2_4_magnitude_once_at_start():
    config = SparsityConfig()
    assert (config.n, config.m, config.criterion) == (2, 4, "magnitude")
    assert config.mask_due(0)
    assert not any(config.mask_due(step) for step in range(1, 50))


@pytest.mark.parametrize("pattern, expected", [("2:4", (2, 4)), (" 1 : 4 ", (1, 4)), ("4:8", (4, 8))])
def test_parse_pattern(pattern, expected):
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "2:2", "two:four", ""])
def test_bad_pattern_names_the_field_and_value(pattern):
    with pytest.raises(ValueError, match="sparsity_pattern") as err:
        SparsityConfig(sparsity_pattern=pattern)
    assert repr(pattern) in str(err.value)


def test_bad_values_name_the_field_and_what_is_accepted():
    with pytest.raises(ValueError, match=r"criterion must be one of \['magnitude'.*got 'random'"):
        SparsityConfig(criterion="random")
    with pytest.raises(ValueError, match="mask_start_step must be an integer >= 0; got -1"):
        SparsityConfig(mask_start_step=-1)
    with pytest.raises(ValueError, match=r"sparsegpt_admm_steps must be an integer >= 0 \(0: off, 30 is a good"):
        SparsityConfig(sparsegpt_admm_steps=-5)
    with pytest.raises(ValueError, match="mask_update_every must be None or an integer >= 1; got 0"):
        SparsityConfig(mask_update_every=0)
    with pytest.raises(ValueError, match="mask_freeze_step=10 has no effect without mask_update_every"):
        SparsityConfig(mask_freeze_step=10)
    with pytest.raises(ValueError, match=r"mask_freeze_step must be an integer >= mask_start_step \(5\); got 3"):
        SparsityConfig(mask_start_step=5, mask_update_every=2, mask_freeze_step=3)
    with pytest.raises(ValueError, match="target_modules entry '\\(' is not a valid regular expression"):
        SparsityConfig(target_modules=["("])
    with pytest.raises(ValueError, match="exclude_modules must be a string or a list of strings; got 3"):
        SparsityConfig(exclude_modules=3)


def test_a_single_pattern_string_becomes_a_list():
    assert SparsityConfig(target_modules="query").target_modules == ["query"]


def test_schedule_recomputes_every_k_steps_until_frozen():
    config = SparsityConfig(mask_start_step=2, mask_update_every=3, mask_freeze_step=8)
    assert [step for step in range(20) if config.mask_due(step)] == [2, 5, 8]


def test_config_drives_hf_argument_parser():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(SparsityConfig).parse_args_into_dataclasses(
        ["--sparsity_pattern", "1:4", "--target_modules", "query", "key", "--mask_update_every", "10"]
    )
    assert (config.n, config.m, config.target_modules, config.mask_update_every) == (1, 4, ["query", "key"], 10)


def test_criterion_options_are_the_settings_that_decided_the_masks():
    assert SparsityConfig().criterion_options() == {}
    options = SparsityConfig(
        criterion="sparsegpt", sparsegpt_admm_steps=30, calibration_samples=64
    ).criterion_options()
    assert options["sparsegpt_admm_steps"] == 30 and options["calibration_samples"] == 64
    assert "sparsegpt_damping" not in SparsityConfig(criterion="wanda").criterion_options()
