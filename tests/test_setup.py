"""scripts/setup.sh repairs a half-done setup, `make unit` without one says to run it,
and an installed xlb carries its C.

setup.sh runs on a copy of this checkout, in a mount namespace of its own whose
/lib/modules is a tmpfs: it may relink the kernel headers there without touching
the machine's. Debian's packages are taken as installed (the machine's setup did that).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOD = Path("/lib/modules") / os.uname().release
# In the order of setup.sh's `sort -V`: the last is the one it links.
HEADERS = sorted(Path("/usr/src").glob("linux-headers-*-amd64"),
                 key=lambda p: [int(n) if n.isdigit() else n for n in re.split(r"(\d+)", p.name)])
SOURCES = ("scripts", "control", "bpf", "pyproject.toml", "README.md")


def copy_sources(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def test_a_wheel_carries_the_c_the_control_plane_compiles(tmp_path):
    """A non-editable install has no bpf/ beside it: the C must be in the package."""
    src = copy_sources(tmp_path / "xlb")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=120)
    (wheel,) = tmp_path.glob("xlb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    c = {f"xlb/bpf/{p.name}" for p in (ROOT / "bpf").iterdir() if p.suffix in (".c", ".h")}
    assert "xlb/bpf/xlb.c" in c and c <= names


def setup(checkout: Path, build: Path, source: Path) -> tuple[str, Path, Path]:
    """setup.sh's output, and where build and source point after it, when it
    finds them pointing at `build` and `source`."""
    script = f"""
        mount -t tmpfs tmpfs /lib/modules
        mkdir -p {MOD}
        ln -s {build} {MOD}/build
        ln -s {source} {MOD}/source
        bash {checkout}/scripts/setup.sh </dev/null
        readlink {MOD}/build {MOD}/source
    """
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    *lines, build_now, source_now = out.stdout.splitlines()
    return "\n".join(lines), Path(build_now), Path(source_now)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("setup.sh needs root")
    if not HEADERS:
        pytest.skip("no linux-headers-*-amd64 installed")
    ck = copy_sources(tmp_path_factory.mktemp("setup") / "xlb")
    setup(ck, *good_links())
    return ck


def good_links() -> tuple[Path, Path]:
    return HEADERS[-1], Path(str(HEADERS[-1]).removesuffix("-amd64") + "-common")


def venv_python(ck: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ck / ".venv/bin/python"), "-I", *args], capture_output=True, text=True,
                          cwd="/", timeout=120)


@pytest.mark.netns
def test_a_second_run_changes_nothing(checkout):
    out, *links = setup(checkout, *good_links())
    assert out.splitlines() == [
        "setup: Debian packages present",
        f"setup: kernel headers for {os.uname().release} present ({HEADERS[-1]})",
        "setup: Python environment up to date",
        "setup: ready: .venv/bin/xlb",
    ]
    assert links == list(good_links())


@pytest.mark.netns
def test_a_package_removed_from_the_venv_is_installed_again(checkout):
    venv_python(checkout, "-m", "pip", "uninstall", "-y", "-q", "pytest")
    out, *_ = setup(checkout, *good_links())
    assert "(it lacks pytest)" in out
    assert venv_python(checkout, "-c", "import pytest").returncode == 0


@pytest.mark.netns
def test_a_copied_checkout_runs_its_own_xlb_not_the_original_s(checkout, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy, symlinks=True)
    out, *_ = setup(copy, *good_links())
    assert f"it lacks xlb from {copy}/control" in out
    where = venv_python(copy, "-c", "import xlb; print(xlb.__file__)").stdout.strip()
    assert where == f"{copy}/control/__init__.py"


@pytest.mark.netns
def test_a_dangling_build_link_is_replaced(checkout):
    """Its headers package removed, build dangles while source may still resolve:
    bcc cannot compile without build's generated headers."""
    out, build, source = setup(checkout, Path("/usr/src/linux-headers-0.0.0-gone-amd64"), good_links()[1])
    assert "setup: linking" in out
    assert (build, source) == good_links()


def test_make_unit_before_setup_says_to_run_it(tmp_path):
    """`make unit` needs no root, so it sets nothing up: in a checkout without
    .venv it says what to run, rather than that the shell found no .venv/bin/python."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    r = subprocess.run(["make", "-s", "unit"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stderr.splitlines()[0]) == \
        (2, "make unit: no .venv/bin/python: run 'make setup' (as root) first"), r.stderr
