"""The Kubernetes releases the tests run match the build definitions they come from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agentrun_harness import controlplane, jaeger

ROOT = Path(__file__).resolve().parents[2]


def test_the_current_release_is_the_one_the_build_module_pins() -> None:
    gomod = (ROOT / "build" / "k8s-1.34" / "go.mod").read_text()
    pinned = re.search(r"k8s\.io/kubernetes v(\d+\.\d+\.\d+)", gomod)
    assert pinned and controlplane.K8S_RELEASES["1.34"] == pinned.group(1)


def test_the_oldest_release_is_debians() -> None:
    script = (ROOT / "scripts" / "build-controlplane.sh").read_text()
    assert f"FULL={controlplane.K8S_RELEASES['1.20']}" in script


def test_the_version_picks_the_cache_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTRUN_K8S_BIN", raising=False)
    monkeypatch.setenv("AGENTRUN_CACHE", "/c")
    monkeypatch.setenv("K8S_VERSION", "1.20")
    assert controlplane.default_bin_dir() == Path("/c/k8s-1.20.2/bin")
    monkeypatch.delenv("K8S_VERSION")
    assert controlplane.default_bin_dir() == Path("/c/k8s-1.34.10/bin")


def test_the_jaeger_the_tests_run_is_the_one_the_build_module_pins() -> None:
    gomod = (ROOT / "build" / "jaeger-1.75" / "go.mod").read_text()
    pinned = re.search(r"github\.com/jaegertracing/jaeger v(\d+\.\d+\.\d+)", gomod)
    assert pinned and jaeger.JAEGER_VERSION == pinned.group(1)
