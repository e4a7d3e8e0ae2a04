"""`attnplug bench`: refuses clearly without a GPU; its summary compares attnplug with stock per configuration."""

import csv
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnplug.bench import speedups
from attnplug.benchmarks import stock


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_a_gpu_says_so_and_exits_non_zero():
    script = Path(sys.executable).with_name("attnplug")
    done = subprocess.run([str(script), "bench"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert "needs a CUDA GPU and found none" in done.stderr


def test_speedups_pair_each_configuration_with_each_peer_row():
    rows = [
        dict(bs="1", page_size="1", provider="torch_unfused", eager_us="100", graph_us="20", device="H100"),
        dict(bs="1", page_size="1", provider="attnplug", eager_us="25", graph_us="2", device="H100"),
        dict(bs="1", page_size="1", provider="attnplug_plain_launch", eager_us="50", graph_us="2", device="H100"),
        dict(bs="8", page_size="1", provider="torch_unfused", eager_us="90", graph_us="30", device="H100"),
        dict(bs="8", page_size="1", provider="attnplug", eager_us="30", graph_us="3", device="H100"),
        dict(bs="8", page_size="1", provider="sglang_fused", eager_us="60", graph_us="6", device="H100"),
        dict(bs="32", page_size="1", provider="attnplug", eager_us="30", graph_us="3", device="H100"),  # no peer row
    ]
    assert speedups(rows) == {("torch_unfused", "eager_us"): [4.0, 3.0], ("torch_unfused", "graph_us"): [10.0, 10.0],
                              ("sglang_fused", "eager_us"): [2.0], ("sglang_fused", "graph_us"): [2.0]}


def test_speedups_of_a_wide_csv_are_its_speedup_columns():
    rows = [dict(bs="1", stock_graph_us="4", attnplug_graph_us="2", speedup_graph="2.0"),
            dict(bs="8", stock_graph_us="9", attnplug_graph_us="3", speedup_graph="3.0")]
    assert speedups(rows) == {("stock", "speedup_graph"): [2.0, 3.0]}


def test_verify_attention_benchmark_smoke_run(tmp_path):
    """bench_verify_attention.py on tiny shapes under the interpreter: every section runs and its CSV reads back."""
    import csv

    from attnplug.benchmarks import bench_verify_attention

    bench_verify_attention.main(["--smoke", "--out", str(tmp_path)])
    with open(tmp_path / "verify_attention.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["section"] for r in rows} == {"grid", "ragged", "mixed"}
    ours = [r for r in rows if r["impl"] == "attnplug"]
    assert len(ours) == 4 and all(float(r["eager_us"]) > 0 for r in ours)
    verify = [r for r in ours if r["section"] in ("grid", "ragged") and int(r["q_len"]) > 1]
    assert verify and all(float(r["x_vs_own_decode"]) > 0 for r in verify)
    for row in rows:  # every provider that ran the same batch as attnplug agrees with it
        if row["max_abs_diff"]:
            assert float(row["max_abs_diff"]) < 1e-4, row


def test_draft_metadata_benchmark_smoke_run(tmp_path):
    """bench_draft_metadata.py on tiny shapes under the interpreter: outputs checked, CSV reads back."""
    import csv

    from attnplug.benchmarks import bench_draft_metadata

    bench_draft_metadata.main(["--smoke", "--out", str(tmp_path)])
    with open(tmp_path / "draft_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["provider"] == "attnplug"]
    assert len(ours) == 2 and all(r["launches"] == "1" and float(r["eager_us"]) > 0 for r in ours)


def test_verify_attention_benchmark_smoke_run_on_sglang_token_pool(tmp_path):
    """The same benchmark on SGLang's token pool (page 1): attnplug's verify and own-decode rows run."""
    import csv

    from attnplug.benchmarks import bench_verify_attention

    bench_verify_attention.main(["--smoke", "--layout", "sglang", "--page-size", "1", "--sections", "grid",
                                 "--out", str(tmp_path)])
    with open(tmp_path / "verify_attention_sglang_page1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["impl"] == "attnplug"]
    assert len(ours) == 2 and all(float(r["eager_us"]) > 0 for r in ours)
    assert {r["impl"] for r in rows} == {"attnplug", "attnplug_decode"}


VLLM_FETCHED = [stock.provider_name("vllm", v) for v in stock.VLLM_RELEASES if stock.release_dir("vllm", v).is_dir()]
SGLANG_FETCHED = stock.release_dir("sglang", stock.SGLANG_RELEASE).is_dir()  # CI clones may lack the fetched copies


@pytest.fixture
def benchmark():
    """Imports ``attnplug.benchmarks.<name>``; afterwards drops the fetched engine modules it imported (vLLM's
    and SGLang's kernel files), so later tests see no engine."""
    before = set(sys.modules)
    yield lambda name: importlib.import_module(f"attnplug.benchmarks.{name}")
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("vllm", "sglang"):
            del sys.modules[name]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_decode_metadata_benchmark_smoke_run(tmp_path, benchmark):
    """bench_decode_metadata.py --smoke: both sections run, every provider agrees with the torch sequence."""
    benchmark("bench_decode_metadata").main(["--smoke", "--out", str(tmp_path)])
    launch = _rows(tmp_path / "launch_overhead.csv")
    assert {(r["kernel"], r["launch"]) for r in launch} == {
        ("tiny_kernel", "plain"), ("tiny_kernel", "fast"), ("decode_metadata_kernel", "plain"),
        ("decode_metadata_kernel", "fast"), ("torch_add_", "torch")}
    assert all(float(r["host_us_per_call"]) > 0 for r in launch)
    rows = _rows(tmp_path / "decode_metadata.csv")
    providers = {"torch_unfused", "attnplug", "attnplug_plain_launch"}
    if SGLANG_FETCHED:
        providers |= {"sglang_fused", "sglang_fused_zero_tail"}
    assert {r["provider"] for r in rows} == providers
    assert len(rows) == 4 * len(providers)  # bs 1, 3 x page 1, 4
    assert all(float(r["eager_us"]) > 0 and r["graph_us"] == "" for r in rows)


def test_metadata_copy_benchmark_smoke_run(tmp_path, benchmark):
    """bench_metadata_copy.py --smoke: both providers' copies checked, CSV reads back."""
    benchmark("bench_metadata_copy").main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "metadata_copy.csv")
    assert sorted(r["provider"] for r in rows) == ["attnplug", "copy_loop"]
    assert all(float(r["eager_us"]) > 0 for r in rows)


def test_nsa_draft_copy_benchmark_smoke_run(tmp_path, benchmark):
    """bench_nsa_draft_copy.py --smoke: SGLang 0.5.8's copies and the patch's write the same buffers."""
    benchmark("bench_nsa_draft_copy").main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "nsa_draft_copy.csv")
    assert sorted(r["flashmla_kv"] for r in rows) == ["False", "True"]
    assert all(float(r["stock_eager_us"]) > 0 and float(r["attnplug_eager_us"]) > 0 for r in rows)
    assert list(rows[0]).count("device") == 1


def test_paged_attention_benchmark_smoke_run(tmp_path, benchmark):
    """bench_paged_attention.py --smoke: decode, mixed and host sections; every peer agrees with attnplug."""
    benchmark("bench_paged_attention").main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "paged_attention.csv")
    vllm = set(VLLM_FETCHED)
    impls = {"decode": {"attnplug", "flex_attention", "sdpa_dense", *vllm, *(["sglang_0_5"] if SGLANG_FETCHED else [])},
             "mixed": {"attnplug", "flex_attention", *vllm, *([f"{VLLM_FETCHED[-1]}_hand_split"] if vllm else [])},
             "host": {"attnplug", *vllm}}
    for section, names in impls.items():
        got = [r for r in rows if r["section"] == section]
        assert {r["impl"] for r in got} == names, section
        assert all(float(r["host_us" if section == "host" else "eager_us"]) > 0 for r in got)
    assert len([r for r in rows if r["section"] == "decode"]) == 2 * len(impls["decode"])  # bs 1, 3
    ours = {(r["section"], r["bs"]): float(r["eager_us"]) for r in rows
            if r["impl"] == "attnplug" and r["section"] in ("decode", "mixed")}
    for r in rows:
        if r["section"] in ("decode", "mixed") and r["impl"] != "attnplug":  # the smoke run's time is the eager one
            assert float(r["max_abs_diff"]) < 1e-4, r
            assert float(r["attnplug_x"]) == pytest.approx(float(r["eager_us"]) / ours[r["section"], r["bs"]], abs=2e-3)


def test_decode_step_benchmark_smoke_run(tmp_path, benchmark):
    """bench_decode_step.py (what `attnplug bench` runs by default) --smoke: the whole step, CSV and plot."""
    benchmark("bench_decode_step").main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "decode_step.csv")
    stock = bool(VLLM_FETCHED)
    assert sorted(r["impl"] for r in rows) == (["attnplug", "attnplug", "stock", "stock"] if stock else
                                                ["attnplug", "attnplug"])
    assert all(r["layers"] == "2" and float(r["eager_step_us"]) > 0 and r["graph_step_us"] == "" for r in rows)
    if stock:
        assert all(float(r["max_abs_diff"]) < 1e-4 for r in rows)
    assert (tmp_path / "decode_step.png").stat().st_size > 0


@pytest.mark.skipif(not SGLANG_FETCHED, reason="both providers run SGLang's Triton decode kernel, not fetched here "
                                                "(attnplug bench --fetch-stock)")
def test_sglang_kv_splits_benchmark_smoke_run(tmp_path, benchmark):
    """bench_sglang_kv_splits.py --smoke: stock and planned splits give the same output (and the reference's)."""
    benchmark("bench_sglang_kv_splits").main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "sglang_kv_splits.csv")
    assert sorted(r["lengths"] for r in rows) == ["mixed", "uniform"]
    for row in rows:
        assert float(row["stock_eager_us"]) > 0 and float(row["attnplug_eager_us"]) > 0
        assert float(row["max_abs_diff"]) < 2e-3 and int(row["planned_splits"]) >= 1


def test_fp8_attention_benchmark_smoke_run(tmp_path, benchmark):
    """bench_fp8_attention.py --smoke: attnplug over FP8 and bf16 and vLLM 0.33's FP8 path agree, CSV reads back."""
    benchmark("bench_fp8_attention").main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "fp8_attention.csv")
    impls = {"attnplug", "attnplug_bf16", *(["vllm_0_33"] if "vllm_0_33" in VLLM_FETCHED else [])}
    points = [("decode", "1"), ("decode", "3"), ("verify", "2"), ("mixed", "2")]
    assert sorted((r["section"], r["bs"]) for r in rows) == sorted(points * len(impls))
    for r in rows:
        assert float(r["eager_us"]) > 0
        if r["impl"] == "attnplug_bf16":  # the FP8 cache's quantization error, no more
            assert 0 < float(r["max_abs_diff"]) < 0.25, r
        elif r["impl"] != "attnplug":  # vLLM over the same FP8 values
            assert float(r["max_abs_diff"]) < 1e-4, r
