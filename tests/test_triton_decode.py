"""The Triton 2:4 decode kernel: its layout, its plug-in facts and the policy's use of it (CPU), the kernel and a
swapped Llama under Triton's CPU interpreter (a child process with `TRITON_INTERPRET=1`; skipped where Triton is not
installed), and the kernel, its layer and the swap on a GPU (`needs_triton_gpu`).

Run the interpreter tests where Triton is installed (PyTorch's CUDA wheels bring it; on a CPU-only PyTorch,
`pip install triton`): `python -m pytest -q tests/test_triton_decode.py`.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_sparse import prune_
from hf_sparse.inference import triton_decode
from hf_sparse.inference.kernels import CUSPARSELT, KERNELS, TRITON_DECODE
from hf_sparse.inference.kernels.base import GemmInputs, GemmRequest, Run, SweepSettings, Timing
from hf_sparse.inference.kernels.triton_decode import support_problem
from hf_sparse.inference.triton_linear import TritonDecodeLinear
from hf_sparse.inference.units import DEFAULT_FUSE_GROUPS, find_units
from hf_sparse.masks import nm_mask
from tests.conftest import REPO, needs_triton_gpu, subprocess_env
from tests.test_autotune import FakeTimings
from tests.test_inference import FP16_KERNELS, decide

PATTERNS = list(itertools.combinations(range(4), 2))  # the six ways to keep 2 of 4


def two_four(out_features, in_features, dtype=torch.float16, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    return (w * nm_mask(w)).to(device)


def rel_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def tolerance(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 5e-3  # as cuSPARSELt's tests and sweeps


# -- the layout (CPU) --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_layout_round_trips_every_2_4_pattern_exactly(dtype):
    gen = torch.Generator().manual_seed(1)
    rows, groups = 24, 40  # in_features 160: not a multiple of 32, so the last metadata word is partly padding
    pattern = torch.randint(0, len(PATTERNS), (rows, groups), generator=gen)
    mask = torch.zeros(rows, groups, 4)
    for index, (a, b) in enumerate(PATTERNS):
        mask[..., a] += (pattern == index).float()
        mask[..., b] += (pattern == index).float()
    weight = (torch.randn(rows, groups, 4, generator=gen) * mask).to(dtype)
    weight[0, :3] = 0  # groups with fewer than two nonzeros keep zeros
    weight[1, 0] = torch.tensor([0, 0, 0, 5.0])
    weight[1, 1] = torch.tensor([0, -3.0, 0, 0])
    weight = weight.reshape(rows, groups * 4)
    assert set(pattern.flatten().tolist()) == set(range(6))
    values, meta = triton_decode.compress(weight)
    assert values.shape == (rows, groups * 2) and values.dtype == dtype
    assert meta.shape == (rows, 5) and meta.dtype == torch.int32
    assert torch.equal(triton_decode.decompress(values, meta, groups * 4), weight)
    # the layout itself: per group a nibble (first kept position, second << 2), eight groups a word
    nibble = lambda r, g: (int(meta[r, g // 8]) >> (4 * (g % 8))) & 15  # noqa: E731
    a, b = PATTERNS[int(pattern[5, 9])]
    assert nibble(5, 9) == a | (b << 2)
    assert values[5, 18].item() == weight[5, 36 + a].item() and values[5, 19].item() == weight[5, 36 + b].item()
    assert nibble(1, 0) == 0 | (3 << 2) and values[1, :2].tolist() == [0.0, 5.0]
    assert nibble(1, 1) == 0 | (1 << 2) and values[1, 2:4].tolist() == [0.0, -3.0]  # a zero at the lowest free


def test_the_layout_refuses_what_is_not_2_4_and_shapes_without_groups_of_4():
    weight = two_four(8, 16)
    weight[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="not 2:4.*more than 2 nonzeros"):
        triton_decode.compress(weight)
    with pytest.raises(ValueError, match="multiple of 4.*8x6"):
        triton_decode.compress(torch.zeros(8, 6))


def test_configurations_cover_every_decode_row_count():
    for rows in range(1, triton_decode.MAX_ROWS + 1):
        configs = triton_decode.configs_for(rows)
        assert configs and triton_decode.default_config(rows) == configs[0]
        assert (rows <= 8) == any(not c.uses_dot for c in configs)  # register accumulation up to 8 rows
    assert all(not c.uses_dot for c in triton_decode.configs_for(1))
    assert {c.block_m for c in triton_decode.configs_for(17) if c.uses_dot} == {16, 32}  # no 64-row tile for 17
    assert {c.block_m for c in triton_decode.configs_for(64)} == {16, 32, 64}
    assert {c for rows in range(1, 65) for c in triton_decode.configs_for(rows)} == set(triton_decode.CONFIGS)
    x, w = torch.zeros(2, 64, dtype=torch.float16), two_four(32, 64)
    values, meta = triton_decode.compress(w)
    with pytest.raises(ValueError, match="powers of two"):
        triton_decode.decode_linear(x, values, meta, None, (1, 48, 256, 1, 4, 3))
    with pytest.raises(ValueError, match="does not fit inputs of 32 features"):
        triton_decode.decode_linear(x[:, :32], values, meta, None, triton_decode.CONFIGS[0])


# -- the plug-in (CPU) -------------------------------------------------------------------------------------------------


def test_it_is_one_line_of_kernels_after_the_other_2_4_kernels_of_the_model_dtype():
    names = [k.name for k in KERNELS]
    assert names.index("triton_decode") == names.index("cutlass") + 1  # a tie stays on cuSPARSELt or CUTLASS


def test_the_plug_in_says_why_it_cannot_run_and_which_shapes_it_takes():
    cpu = TRITON_DECODE.unsupported_reason(torch.device("cpu"), torch.float16, "model.layers.0.mlp.up_proj")
    assert "compute capability 8.0" in cpu and "on cpu" in cpu and "model.layers.0.mlp.up_proj" in cpu
    assert support_problem("cuda", torch.bfloat16, (9, 0)) is None
    missing = support_problem("cuda", torch.float16, (9, 0), triton_missing=triton_decode_missing())
    assert "needs Triton" in missing and "pip install triton" in missing
    assert "found 7.5" in support_problem("cuda", torch.float16, (7, 5))
    fp32 = support_problem("cuda", torch.float32, (9, 0), layer="x.q_proj")
    assert "float16 or bfloat16" in fp32 and "float32" in fp32 and "x.q_proj" in fp32
    assert TRITON_DECODE.shape_problem((4096, 14336), torch.bfloat16) is None
    assert "24x40" in TRITON_DECODE.shape_problem((24, 40), torch.float16)
    assert TRITON_DECODE.weight_bytes((4096, 4096), torch.bfloat16) == 4096 * 4096 * 2 * 9 // 16
    from hf_sparse.inference.autotune import Autotuner  # its timings belong to its source and Triton's version

    key = Autotuner(cache_path=False).key(GemmRequest("triton_decode", 4096, 4096, torch.bfloat16, False, 1))
    assert (
        key.startswith("triton_decode@") and "-triton" in key and key.endswith("|4096x4096|bfloat16|nobias|tokens<=8")
    )


def triton_decode_missing():
    code = "import sys; sys.modules['triton'] = None\nfrom hf_sparse.inference import triton_decode\n"
    code += "print(triton_decode.triton_problem())"
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_hf_sparse_imports_and_refuses_cpu_models_as_before_where_triton_is_absent():
    code = """
import sys
sys.modules['triton'] = None  # import triton raises ImportError
import torch
import hf_sparse
from hf_sparse.inference.kernels import KERNELS
from tests.test_inference import pruned_tiny_model
model = pruned_tiny_model().half()
try:
    hf_sparse.swap_to_semi_structured_(model, autotune=False)
except RuntimeError as err:
    print(err)
print([k.name for k in KERNELS])
"""
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                            cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    refusal, names = result.stdout.strip().splitlines()
    assert (
        "(cuSPARSELt) need an NVIDIA GPU" in refusal and "The model was not changed" in refusal
    )  # the first kernel's
    assert "triton_decode" in names


def test_the_autotuner_times_it_up_to_a_prefill_of_8192_rows_only(monkeypatch):
    from hf_sparse.inference.kernels import triton_decode as plug_in

    monkeypatch.setattr(plug_in, "compiled", lambda configs, call: [tuple(c) for c in configs])  # no GPU to build on
    w = two_four(64, 64)
    for rows, expected in ((512, triton_decode.configs_for(512)), (plug_in.PREFILL_ROWS + 1, [])):
        inputs = GemmInputs(torch.zeros(rows, 64, dtype=torch.float16), w, None, rows)
        request = GemmRequest("triton_decode", 64, 64, torch.float16, False, rows)
        problem = TRITON_DECODE.problem(request, inputs, SweepSettings())
        assert problem.configs == [tuple(c) for c in expected]  # above 8192 rows: nothing timed, nothing compiled
    assert all(
        c.uses_dot for c in triton_decode.configs_for(512)
    )  # tensor-core tiles, one block of rows after another


def llama_units():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).half()
    prune_(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units, _ = find_units(model, linears, DEFAULT_FUSE_GROUPS)
    return units


class DecodeTimings(FakeTimings):
    """Dense 1.2 ms; cuSPARSELt 1.5 ms below 4096 tokens, 1.0 from there (`FakeTimings`); the decode kernel 0.7 ms at
    1-64 tokens and, as its sweep would, nothing above."""

    def measure(self, request):
        if request.kernel == "triton_decode":
            ms = 0.7 if request.tokens <= triton_decode.MAX_ROWS else None
            return Timing(ms, tuple(triton_decode.default_config(request.tokens)), request.tokens, 5 if ms else 0)
        return super().measure(request)


def test_the_policy_runs_it_where_its_timings_win_and_keeps_cusparselt_where_it_was_not_timed():
    units = llama_units()  # q/k/v fused 128x64, o_proj, gate_proj, up_proj, down_proj per block
    kernels = (*FP16_KERNELS, TRITON_DECODE)
    decode = decide(units, DecodeTimings(cache_path=False), [1, 16, 64], "none", kernels=kernels)
    assert {p.kernel.name for p in decode} == {"triton_decode"} and {p.status for p in decode} == {"sparse"}
    assert decode[0].runs == {8: Run("triton_decode", tuple(triton_decode.default_config(1))),
                              16: Run("triton_decode", tuple(triton_decode.default_config(16))),
                              64: Run("triton_decode", tuple(triton_decode.default_config(64)))}  # fmt: skip
    # against cuSPARSELt's layer as it would run (dense at 1.2 ms, where cuSPARSELt's 1.5 ms loses): 1.2 / 0.7
    assert "runs on the Triton decode kernel (bias in its epilogue): 1.71x the cuSPARSELt GEMM" in decode[0].reason
    # with a prefill token count it was not timed at: where a dense copy's bytes are allowed, the layers hold its layout
    # in their place, beside cuSPARSELt's, and run it at 1 and 16 tokens (0.7 ms, not dense's 1.2)
    mixed = decide(units, DecodeTimings(cache_path=False), [1, 16, 8192], "copy", kernels=kernels)
    assert {p.holds for p in mixed} == {(CUSPARSELT, TRITON_DECODE)} and {p.status for p in mixed} == {"sparse+sparse"}
    assert [r.kernel for _, r in sorted(mixed[0].runs.items())] == ["triton_decode", "triton_decode", "cusparselt"]
    # compressed only, one layout serves every token count: the kernel not timed at 8192 cannot take the layers,
    # and the same timings decide as before it was listed
    one = decide(units, DecodeTimings(cache_path=False), [1, 16, 8192], "none", kernels=kernels)
    before = decide(units, DecodeTimings(cache_path=False), [1, 16, 8192], "none", kernels=FP16_KERNELS)
    assert {p.kernel.name for p in one} == {"cusparselt"} and all("Triton" not in p.reason for p in one)
    assert [(p.status, p.runs, p.reason) for p in before] == [(p.status, p.runs, p.reason) for p in one]


# -- the layer without a kernel run (CPU) ------------------------------------------------------------------------------


def test_the_layer_holds_9_16_of_the_bytes_emits_its_exact_weight_and_refuses_the_cpu_run():
    w, b = two_four(64, 128), torch.randn(64, dtype=torch.float16)
    layer = TritonDecodeLinear(w, b, name="model.layers.0.mlp.down_proj")
    assert layer.weight_bytes == 64 * 128 * 2 * 9 // 16 and torch.equal(layer.weight, w)
    state = nn.Sequential(layer).state_dict()
    assert list(state) == ["0.weight", "0.bias"] and torch.equal(state["0.weight"], w)
    new = two_four(64, 128, seed=3)
    nn.Sequential(layer).load_state_dict({"0.weight": new, "0.bias": b})
    assert torch.equal(layer.weight, new)
    with pytest.raises(ValueError, match="down_proj: the new weight is not 2:4"):
        layer.set_weight_(torch.ones(64, 128))
    assert torch.equal(layer.weight, new)
    layer.to(torch.bfloat16)  # the values are weights, the positions int32: the layout stays valid
    assert layer.values.dtype == torch.bfloat16 and torch.equal(layer.weight, new.to(torch.bfloat16))
    with pytest.raises(TypeError, match="down_proj: .*float16 or bfloat16.*float32"):
        layer.float()
    assert layer.values.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="down_proj: .*NVIDIA GPU.*on cpu.*restore_dense_"):
        layer(torch.zeros(2, 128, dtype=torch.bfloat16))


# -- the kernel under Triton's interpreter (CPU, a child process) ----------------------------------------------------


def interpreted(mode: str) -> list[dict]:
    pytest.importorskip("triton", reason="Triton is not installed: pip install triton to run the interpreter tests")
    env = dict(subprocess_env(), TRITON_INTERPRET="1")  # read when Triton is imported: a fresh process
    result = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "triton_decode_cases.py"), mode],
                            env=env, capture_output=True, text=True, cwd=REPO, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def check_interpreted(cases: list[dict], matrix_part: str, shapes: list[tuple[int, int]]) -> None:
    """Every case within its dtype's tolerance of the fp32 result, in the inputs' dtype and shape; the `matrix_part`
    cases cover fp16 and bf16 x bias or not x rows 1/3/16/17/64 x `shapes`, with and without split-K."""
    for case in cases:
        dtype = getattr(torch, case["dtype"].removeprefix("torch."))
        assert case["error"] < tolerance(dtype), case
        assert case["out_dtype"] == case["dtype"] and case["out_shape"] == [case["rows"], case["shape"][0]], case
    matrix = [c for c in cases if c["part"] == matrix_part]
    # bfloat16 from 16 rows runs tl.dot, which the interpreter gets wrong (see the script): the GPU tests run those
    expected = {(str(dtype), bias, rows, shape) for dtype in (torch.float16, torch.bfloat16) for bias in (True, False)
                for rows in (1, 3, 16, 17, 64) for shape in shapes if dtype == torch.float16 or rows < 16}  # fmt: skip
    assert {(c["dtype"], c["bias"], c["rows"], tuple(c["shape"])) for c in matrix} == expected
    assert {c["config"][3] for c in matrix} >= {1, 4}  # with and without split-K


def test_interpreted_every_configuration_shape_dtype_bias_and_row_count_matches_the_fp32_result():
    cases = interpreted("kernel")
    configs = {tuple(c["config"]) for c in cases if c["part"] == "config"}
    assert configs == {tuple(c) for c in triton_decode.CONFIGS}
    # K a multiple of the 128 and 256 blocks; of none; not even of 32
    check_interpreted(cases, "matrix", [(48, 256), (32, 352), (40, 100)])


def test_interpreted_a_tiny_llama_swapped_onto_it_matches_the_masked_dense_model():
    (case,) = interpreted("swap")
    assert case["statuses"] == ["not 2:4", "sparse"]  # lm_head is not 2:4
    assert case["layers"] == 10 and case["fused"] == 2  # per block: q/k/v fused, o_proj, gate, up, down
    assert all(p.startswith("Triton decode 2:4") for p in case["plans"])
    assert case["errors"]["1"] < 5e-3 and case["errors"]["16"] < 5e-3
    assert case["compiled_equal"]  # under torch.compile, through its custom op
    assert case["state_identical"] and case["restored"] == 14  # 7 projections per block


# -- on a GPU ----------------------------------------------------------------------------------------------------------

GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (2048, 8192), (6144, 4096)]


@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_every_configuration_matches_at_decode_shapes(shape, dtype):
    w = two_four(*shape, dtype=dtype, device="cuda")
    b = torch.randn(shape[0], device="cuda", dtype=dtype)
    values, meta = triton_decode.compress(w)
    assert torch.equal(triton_decode.decompress(values, meta, shape[1]), w)
    run = lambda x, bias, config: triton_decode.decode_linear(x, values, meta, bias, config)  # noqa: E731
    check_every_configuration(run, w.float(), b, (1, 3, 16, 17, 64))


def check_every_configuration(run, weight: torch.Tensor, bias: torch.Tensor, row_counts) -> None:
    """`run(x, bias, config)` against the fp32 product with `weight` (the float32 weight it stands for), at every
    configuration of each row count, with `bias` and without, in `bias`'s dtype."""
    for rows in row_counts:
        x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=bias.dtype)
        for b in (bias, None):
            expected = F.linear(x.float(), weight, None if b is None else b.float())
            for config in triton_decode.configs_for(rows):
                got = run(x, b, config)
                assert got.dtype == bias.dtype and got.shape == (rows, weight.shape[0])
                assert rel_error(got, expected) < tolerance(bias.dtype), (rows, b is None, config)


@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_layer_runs_its_plans_in_cuda_graphs_and_under_torch_compile(dtype):
    w, b = two_four(4096, 4096, dtype=dtype, device="cuda"), torch.randn(4096, device="cuda", dtype=dtype)
    runs = {8: Run("triton_decode", tuple(triton_decode.configs_for(1)[1])), 16: Run("dense"),
            64: Run("triton_decode", tuple(triton_decode.configs_for(64)[0]))}  # fmt: skip
    layer = TritonDecodeLinear(w, b, runs=runs, keep_dense=True, name="o_proj")
    check_in_graphs_and_compiled(layer, w.float(), b)


def check_in_graphs_and_compiled(layer: TritonDecodeLinear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """`layer` against the fp32 product with `weight` (the float32 weight it stands for) and `bias` at 1/5/16/64 rows:
    eagerly, replayed from a CUDA graph (identical to eager), and (1 and 64 rows) as the custom op torch.compile
    traces."""
    dtype = bias.dtype
    for rows in (1, 5, 16, 64):
        x = torch.randn(rows, layer.in_features, device="cuda", dtype=dtype)
        expected = F.linear(x.float(), weight, bias.float())
        eager = layer(x)
        assert eager.dtype == dtype and rel_error(eager, expected) < tolerance(dtype), rows
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), rows
        if rows in (1, 64):  # the kernel as the custom op torch.compile traces
            compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
            assert rel_error(compiled, expected) < tolerance(dtype), rows


@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_swap_runs_a_llama_on_it_where_its_timings_win_and_generates_as_the_dense_model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sparse import restore_dense_, swap_to_semi_structured_

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    prune_(model)
    prompt = torch.randint(0, 256, (4, 8), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=prompt).logits
        dense_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
    tuner = DecodeTimings(cache_path=False)
    report = swap_to_semi_structured_(model, token_counts=[1, 16, 64], autotune=tuner, dense_fallback="none",
                                      cutlass=False, eager_graphs=False)  # fmt: skip
    assert {r.status for r in report.two_four} == {"sparse"}
    layers = [m for m in model.modules() if isinstance(m, TritonDecodeLinear)]
    assert len(layers) == 2 * 5
    with torch.no_grad():
        assert rel_error(model(input_ids=prompt).logits, expected) < tolerance(dtype)
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert (tokens[:, 8:] == dense_tokens[:, 8:]).float().mean() >= 0.75  # greedy decoding may part at a near tie
    assert len(restore_dense_(model)) == 2 * 7


@needs_triton_gpu
def test_gpu_the_autotuner_sweeps_it_in_a_child_process():
    from hf_sparse.inference.autotune import Autotuner

    tuner = Autotuner(cache_path=False)
    gemms = [GemmRequest("triton_decode", 4096, 4096, torch.bfloat16, True, t) for t in (1, 16, 128)]
    one, sixteen, prefill = tuner.timings(gemms, torch.device("cuda"))
    assert one.ms and one.candidates >= 2 and tuple(one.config) in set(map(tuple, triton_decode.configs_for(1)))
    assert sixteen.ms and tuple(sixteen.config) in set(map(tuple, triton_decode.configs_for(16)))
    assert prefill.ms is None and prefill.candidates == 0


# -- the decode benchmark's arguments (CPU; it runs on a GPU) ----------------------------------------------------------


def test_the_decode_benchmark_takes_the_llama_projection_shapes_and_refuses_bad_arguments(capsys):
    from hf_sparse.inference import decode_bench

    args = decode_bench.parse_args([])
    assert args.models == ["llama-3-8b", "llama-3.2-1b"] and args.dtypes == ["float16", "bfloat16"]
    assert args.tokens == [1, 16, 64] and args.kernels == ["triton_decode", "cusparselt", "triton_decode_fp8", "fp8"]
    for model, (hidden, heads, kv_heads, intermediate) in {"llama-3-8b": (4096, 32, 8, 14336),
                                                           "llama-3.2-1b": (2048, 32, 8, 8192)}.items():  # fmt: skip
        head_dim = hidden // heads
        assert decode_bench.SHAPES[model] == {"qkv": (hidden + 2 * kv_heads * head_dim, hidden),
                                              "o_proj": (hidden, hidden), "gate/up": (intermediate, hidden),
                                              "down": (hidden, intermediate)}  # fmt: skip
    args = decode_bench.parse_args(["--models", "llama-3.2-1b", "--tokens", "1", "3", "--json", "out.json"])
    assert args.models == ["llama-3.2-1b"] and args.tokens == [1, 3] and args.json == "out.json"
    for bad, words in ((["--models", "llama-2"], "--models: ['llama-2'] unknown"), (["--tokens", "0"], "positive"),
                       (["--kernels", "cutlass"], "choose from ['triton_decode', 'cusparselt', 'triton_decode_fp8'")):  # fmt: skip
        with pytest.raises(SystemExit):
            decode_bench.parse_args(bad)
        assert words in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            decode_bench.main(["--tokens", "1"])


@needs_triton_gpu
def test_gpu_the_decode_benchmark_measures_every_kernel_beside_dense(tmp_path, capsys):
    from hf_sparse.inference import decode_bench

    out = tmp_path / "decode.json"
    decode_bench.main(["--models", "llama-3.2-1b", "--dtypes", "bfloat16", "--tokens", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["copy_bandwidth_gbs"] > 0 and len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["dense_ms"] > 0 and row["ceiling_ms"] == pytest.approx(row["dense_ms"] * 9 / 16)
        assert row["triton_decode"]["ms"] and row["cusparselt"]["ms"] and row["triton_decode_fp8"]["ms"], row
        assert row["fp8"]["ms"] or row["fp8"]["why_not"], row
    assert "copy bandwidth" in capsys.readouterr().out


def test_on_a_gpu_the_kernel_is_opt_in_until_timed_there(monkeypatch):
    from hf_sparse.inference.kernels.triton_decode import OPT_IN_ENV

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton_decode, "triton_problem", lambda: None)
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    reason = TRITON_DECODE.unsupported_reason(torch.device("cuda"), torch.float16)
    assert "opt-in" in reason and f"{OPT_IN_ENV}=1" in reason
    monkeypatch.setenv(OPT_IN_ENV, "1")
    assert TRITON_DECODE.unsupported_reason(torch.device("cuda"), torch.float16) is None
