"""`attnplug bench`: refuses clearly without a GPU; its summary compares attnplug with stock per configuration."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnplug.bench import speedups


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_a_gpu_says_so_and_exits_non_zero():
    script = Path(sys.executable).with_name("attnplug")
    done = subprocess.run([str(script), "bench"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert "needs a CUDA GPU and found none" in done.stderr


def test_speedups_pair_each_configuration_with_its_stock_row():
    rows = [
        dict(bs="1", page_size="1", provider="torch_unfused", eager_us="100", graph_us="20", device="H100"),
        dict(bs="1", page_size="1", provider="attnplug", eager_us="25", graph_us="2", device="H100"),
        dict(bs="8", page_size="1", provider="torch_unfused", eager_us="90", graph_us="30", device="H100"),
        dict(bs="8", page_size="1", provider="attnplug", eager_us="30", graph_us="3", device="H100"),
        dict(bs="8", page_size="1", provider="sglang_fused", eager_us="50", graph_us="4", device="H100"),
        dict(bs="32", page_size="1", provider="attnplug", eager_us="30", graph_us="3", device="H100"),  # no stock row
    ]
    assert speedups(rows) == {"eager_us": [4.0, 3.0], "graph_us": [10.0, 10.0]}


def test_verify_attention_benchmark_smoke_run(tmp_path):
    """bench_verify_attention.py on tiny shapes under the interpreter: every section runs and its CSV reads back."""
    import csv

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import bench_verify_attention

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

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import bench_draft_metadata

    bench_draft_metadata.main(["--smoke", "--out", str(tmp_path)])
    with open(tmp_path / "draft_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["provider"] == "attnplug"]
    assert len(ours) == 2 and all(r["launches"] == "1" and float(r["eager_us"]) > 0 for r in ours)


def test_verify_attention_benchmark_smoke_run_on_sglang_token_pool(tmp_path):
    """The same benchmark on SGLang's token pool (page 1): attnplug's verify and own-decode rows run."""
    import csv

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import bench_verify_attention

    bench_verify_attention.main(["--smoke", "--layout", "sglang", "--page-size", "1", "--sections", "grid",
                                 "--out", str(tmp_path)])
    with open(tmp_path / "verify_attention_sglang_page1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["impl"] == "attnplug"]
    assert len(ours) == 2 and all(float(r["eager_us"]) > 0 for r in ours)
    assert {r["impl"] for r in rows} == {"attnplug", "attnplug_decode"}
