import pytest

from hf_sparse.inference.benchmark import DEFAULT_VARIANTS, MODES, format_table, options, parse_args


def test_defaults_are_the_issue_benchmark():
    args = parse_args([])
    assert args.batch_sizes == [4, 16, 64, 256]
    assert args.seq_len == 384 and args.dtype == "float16"
    assert args.modes == ["eager", "graphs", "compile"] == list(MODES)  # every mode, in one run
    assert args.variants == list(DEFAULT_VARIANTS) == ["dense", "2:4"]
    assert args.model is None and not args.no_fuse_qkv and not args.attention_mask


def test_other_models_sizes_and_variants():
    args = parse_args(
        ["--model", "my/qa-model", "--batch-sizes", "32", "1", "8", "--seq-len", "128", "--dtype", "bfloat16"]
        + ["--variants", "stock", "2:4", "2:4-lean", "--modes", "compile", "eager", "--output-dir", "out"]
        + ["--reps", "5"]
    )
    assert args.model == "my/qa-model" and args.batch_sizes == [1, 8, 32] and args.seq_len == 128
    assert args.dtype == "bfloat16" and args.modes == ["eager", "compile"] and args.output_dir == "out"
    assert args.reps == 5
    assert args.variants == ["dense", "2:4", "2:4-lean", "stock"]  # dense is always the baseline


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


def test_table_shows_every_mode_memory_and_logit_differences():
    result = {
        "variants": ["dense", "2:4"],
        "modes": ["eager", "graphs"],
        "args": {"seq_len": 384},
        "rows": [
            {"mode": "eager", "batch": 4, "tokens": 1536, "dense": {"ms": 4.0}, "2:4": {"ms": 4.2, "speedup": 0.952}},
            {"mode": "graphs", "batch": 4, "tokens": 1536, "dense": {"ms": 2.0}, "2:4": {"ms": 1.6, "speedup": 1.25}},
            {"mode": "eager", "batch": 16, "tokens": 6144, "dense": {"ms": 5.0}, "2:4": None},
        ],
        "memory": {"dense": {"ratio": 1.0}, "2:4": {"ratio": 0.99}},
        "max_abs_diff_vs_masked_dense": {"eager": {"2:4": 0.0039}, "graphs": {"2:4": 0.0041}},
    }
    table = format_table(result).splitlines()
    assert table[0] == "| batch | tokens | eager: dense ms | 2:4 ms | x | graphs: dense ms | 2:4 ms | x |"
    assert table[2] == "| 4 | 1536 | 4.000 | 4.200 | 0.95x | 2.000 | 1.600 | 1.25x |"
    assert table[3] == "| 16 | 6144 | 5.000 | failed | - | - | - | - |"
    assert table[5] == "weight memory of the 2:4 layers vs dense: 2:4 0.990x"
    assert table[6] == "max |logits - masked dense eager logits| at batch 4, eager: 2:4 3.90e-03"
    assert table[7] == "max |logits - masked dense eager logits| at batch 4, graphs: 2:4 4.10e-03"

    # --swap-per-batch: each batch size ran its own swap, so each has its own memory line
    result["memory_by_batch"] = {"4": {"dense": {"ratio": 1.0}, "2:4": {"ratio": 0.75}}, "16": result["memory"]}
    table = format_table(result).splitlines()
    assert table[5] == "weight memory of the 2:4 layers vs dense (swapped for batch 4): 2:4 0.750x"
    assert table[6] == "weight memory of the 2:4 layers vs dense (swapped for batch 16): 2:4 0.990x"


def test_swap_per_batch_is_an_option():
    assert parse_args([]).swap_per_batch is False
    assert options(swap_per_batch=True, batch_sizes=[16, 64]).swap_per_batch is True


def test_options_for_python_callers_take_modes():
    args = options(modes=["graphs"], variants=["dense", "2:4"], batch_sizes=[16, 4])
    assert args.modes == ["graphs"] and args.batch_sizes == [4, 16]
    with pytest.raises(ValueError, match="--modes"):
        options(modes=["turbo"])


def test_recipe_timing_keeps_the_graph_rows():
    from hf_sparse.run_report import timing_from_benchmark

    result = {
        "device": "NVIDIA H100 80GB HBM3",
        "rows": [
            {"mode": "eager", "batch": 4, "dense": {"ms": 4.0}, "2:4": {"ms": 4.2, "speedup": 0.95}},
            {"mode": "graphs", "batch": 4, "dense": {"ms": 2.0}, "2:4": {"ms": 1.6, "speedup": 1.25}},
        ],
        "memory": {"2:4": {"ratio": 0.99}},
    }
    timing = timing_from_benchmark(result, 384)
    assert timing["rows"] == [{"batch_size": 4, "dense_ms": 2.0, "sparse_ms": 1.6, "speedup": 1.25}]


def test_the_report_and_card_give_each_timed_model_its_f1_memory_and_latency(tmp_path):
    from hf_sparse.run_report import card_kwargs, markdown, timing_from_benchmark

    result = {
        "device": "NVIDIA H100 80GB HBM3",
        "rows": [
            {"mode": "graphs", "batch": b, "dense": {"ms": 2.0 * b}, "2:4": {"ms": 1.8 * b, "speedup": 1 / 0.9},
             "fp8": {"ms": 1.25 * b, "speedup": 1.6}, "fp8-dense": {"ms": 1.6 * b, "speedup": 1.25}}
            for b in (4, 64)
        ],
        "memory": {"dense": {"ratio": 1.0}, "2:4": {"ratio": 1.0}, "fp8": {"ratio": 0.314}, "fp8-dense": {"ratio": 0.502}},
    }  # fmt: skip
    timing = timing_from_benchmark(result, 384)
    assert timing["rows"][1] == {"batch_size": 64, "dense_ms": 128.0, "sparse_ms": 115.2, "speedup": 1 / 0.9,
                                 "fp8_ms": 80.0, "fp8_speedup": 1.6, "fp8_dense_ms": 102.4, "fp8_dense_speedup": 1.25}  # fmt: skip
    assert "static activation scales" in timing["description"]
    stages = {"dense": {"f1": 44.9, "exact_match": 31.8}, "swapped": {"f1": 41.7, "exact_match": 28.8},
              "fp8": {"f1": 41.5, "exact_match": 28.6, "layers": {"fp8 2:4": 24}}}  # fmt: skip
    report = {"stages": stages, "skipped": {}, "timing": timing}
    table = card_kwargs(report, tmp_path)["benchmark"]
    assert [row["model"] for row in table] == ["dense fp16", "2:4 fp16", "2:4 FP8 (e4m3)", "dense FP8 (e4m3)"]
    fp8 = table[2]
    assert (fp8["F1"], fp8["exact match"], fp8["weight memory"]) == (41.5, 28.6, "0.314x")
    assert fp8["batch 64 (ms)"] == "80.000 (1.60x)" and table[0]["batch 4 (ms)"] == "8.000 (1.00x)"
    assert table[3]["F1"] is None  # its stage did not run: the card leaves the cell empty
    text = markdown(report)
    assert "| 2:4 FP8 (e4m3) | 41.50 | 28.60 | 0.314x | 5.000 (1.60x) | 80.000 (1.60x) |" in text
    assert "on FP8 (e4m3) 2:4 kernels (24 of 24 GEMMs FP8 2:4)" in text
    from hf_sparse.hub import _format_cell

    assert _format_cell(None) == "—"
