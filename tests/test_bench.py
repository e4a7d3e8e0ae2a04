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
