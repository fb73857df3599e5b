import pytest

from hf_sparse.inference.benchmark import VARIANTS, format_table, parse_args


def test_defaults_are_the_issue_benchmark():
    args = parse_args([])
    assert args.batch_sizes == [4, 16, 64, 256]
    assert args.seq_len == 384 and args.dtype == "float16" and args.mode == "graphs"
    assert args.variants == list(VARIANTS) and args.variants[0] == "dense"
    assert args.model is None and not args.no_fuse_qkv and not args.attention_mask


def test_other_models_sizes_and_variants():
    args = parse_args(
        ["--model", "my/qa-model", "--batch-sizes", "32", "1", "8", "--seq-len", "128", "--dtype", "bfloat16"]
        + ["--variants", "stock", "2:4", "--mode", "eager", "--output-dir", "out", "--reps", "5"]
    )
    assert args.model == "my/qa-model" and args.batch_sizes == [1, 8, 32] and args.seq_len == 128
    assert args.dtype == "bfloat16" and args.mode == "eager" and args.output_dir == "out" and args.reps == 5
    assert args.variants == ["dense", "2:4", "stock"]  # dense is always the baseline


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-sizes", "0"], "--batch-sizes must be positive"),
        (["--seq-len", "-3"], "--seq-len must be a positive"),
        (["--reps", "0"], "--reps and --rounds must be >= 1"),
        (["--dtype", "float32"], "invalid choice"),
        (["--variants", "magic"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_table_shows_speedups_and_memory():
    result = {
        "variants": ["dense", "2:4"],
        "rows": [{"batch": 4, "tokens": 1536, "dense": {"ms": 2.0}, "2:4": {"ms": 1.6, "speedup": 1.25}}],
        "memory": {"dense": {"ratio": 1.0}, "2:4": {"ratio": 0.5625}},
        "max_abs_diff_vs_masked_dense": {"2:4": 0.0039},
    }
    table = format_table(result).splitlines()
    assert table[0] == "| batch | tokens | dense ms | 2:4 ms | x |"
    assert table[2] == "| 4 | 1536 | 2.000 | 1.600 | 1.25x |"
    assert table[4] == "weight memory of the 2:4 layers vs dense: 2:4 0.562x"
    assert table[5] == "max |logits - masked dense eager logits| at batch 4: 2:4 3.90e-03"
