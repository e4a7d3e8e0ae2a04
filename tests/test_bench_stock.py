"""Where `attnplug bench` takes the stock kernels from: the installed engine first, fetched copies for the rest."""

import sys

import pytest

from attnplug.benchmarks import stock


def _fake_vllm(root, tag):
    """A package tree holding vLLM's attention module path, whose ``unified_attention`` is ``tag``."""
    module = root / "vllm" / "v1" / "attention" / "ops" / "triton_unified_attention.py"
    module.parent.mkdir(parents=True)
    for folder in (root / "vllm", *module.parents[:3]):
        (folder / "__init__.py").touch()
    module.write_text(f"unified_attention = {tag!r}\n")


@pytest.fixture
def engines(tmp_path, monkeypatch):
    """An empty stock dir and an 'installed' vLLM of a chosen version; module caches cleared around the test."""
    fetched, installed = tmp_path / "stock", tmp_path / "site"
    monkeypatch.setenv(stock.STOCK_DIR_ENV, str(fetched))
    for name in [m for m in sys.modules if m.split(".")[0] == "vllm"]:  # an engine imported by an earlier test
        monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)

    def install(version):
        _fake_vllm(installed, f"installed {version}")
        monkeypatch.syspath_prepend(str(installed))
        monkeypatch.setattr(stock, "installed_version", lambda engine: version if engine == "vllm" else None)

    def fetch(version):
        _fake_vllm(stock.release_dir("vllm", version), f"fetched {version}")

    caches = (stock.vllm_attention, stock.sglang_kernels)
    for cache in caches:
        cache.cache_clear()
    yield install, fetch
    for cache in caches:
        cache.cache_clear()
    for name in set(sys.modules) - before:
        if name.split(".")[0] == "vllm":
            del sys.modules[name]


def _kernels():
    return {name: (k.origin == "installed", k[stock.VLLM_ATTENTION].unified_attention)
            for name, k in stock.vllm_attention().items()}


def test_the_installed_release_is_used_and_the_other_comes_from_its_fetched_copy(engines):
    install, fetch = engines
    install("0.33.0")
    fetch("0.32.0")
    fetch("0.33.0")  # fetched too, but the installed one wins
    assert _kernels() == {"vllm_0_32": (False, "fetched 0.32.0"), "vllm_0_33": (True, "installed 0.33.0")}
    assert stock.describe()[:2] == [f"vLLM 0.32.0 unified_attention: {stock.release_dir('vllm', '0.32.0')}",
                                    "vLLM 0.33.0 unified_attention: installed"]


def test_an_installed_release_the_benchmarks_do_not_transcribe_is_not_used(engines, capsys):
    install, fetch = engines
    install("0.31.2")
    fetch("0.33.0")
    assert _kernels() == {"vllm_0_33": (False, "fetched 0.33.0")}
    assert "installed vllm 0.31.2 is not a release these benchmarks transcribe" in capsys.readouterr().out


def test_nothing_installed_or_fetched_gives_no_provider_and_says_so(engines):
    assert stock.vllm_attention() == {}
    assert stock.describe()[:2] == ["vLLM 0.32.0 unified_attention: missing", "vLLM 0.33.0 unified_attention: missing"]


def test_the_stock_dir_is_the_environment_variable_then_a_checkout_vendor_then_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(stock.STOCK_DIR_ENV, str(tmp_path / "chosen"))
    assert stock.stock_dir() == tmp_path / "chosen"
    monkeypatch.delenv(stock.STOCK_DIR_ENV)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert stock.stock_dir() == tmp_path / "home" / ".cache" / "attnplug" / "stock"
    (tmp_path / ".vendor").mkdir()
    assert stock.stock_dir() == tmp_path / ".vendor"
