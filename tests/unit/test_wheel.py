"""The wheel (and so the image, which installs only it) holds the product and nothing else:
no test harness, no tests, no benchmarks."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _uv() -> str:
    found = os.environ.get("TEST_UV") or shutil.which("uv")
    if not found:
        cached = sorted(glob.glob(os.path.expanduser("~/.cache/agentrun/uv-*/bin/uv")))
        found = cached[-1] if cached else None
    if not found or not Path(found).exists():
        pytest.fail("no uv to build the wheel with: run the tests through `make test`")
    return found


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [_uv(), "build", "--wheel", "--quiet", "--out-dir", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("agentrun-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_the_wheel_holds_the_two_product_packages_only(wheel_files: list[str]) -> None:
    tops = {name.split("/", 1)[0] for name in wheel_files}
    packages = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert packages == {"agentrun_operator", "agentrun_sse"}, sorted(tops)


def test_no_harness_code_ships(wheel_files: list[str]) -> None:
    shipped = [
        name
        for name in wheel_files
        if "harness" in name or "/testing" in name or name.startswith(("tests/", "bench/"))
    ]
    assert not shipped, f"test harness code in the wheel: {shipped}"
    # The modules the product does ship, including the mock LLM command.
    for module in ("agentrun_operator/cli.py", "agentrun_operator/mockllm.py"):
        assert module in wheel_files
    # node.py rewrites host iptables and cgroups as root: never in the image.
    assert not [n for n in wheel_files if n.endswith(("/node.py", "/controlplane.py"))]
