"""`make unit` (-m "not kernel and not netns and not lab") runs no test that
makes a namespace: such a test needs root, and on a shared machine the lock
that the lab's tests are run under. Every test file is named where the
README and DEVELOPERS.md say what the tests cover. And a test that hangs
fails (conftest.py's bound), rather than hold the run for ever."""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ISOLATED = {"kernel", "netns", "lab"}
NAMESPACE_WORDS = {"netns", "unshare"}     # argv words: `ip netns ...`, `unshare ...`
NAMESPACE_CALLS = {"unshare", "FibNet"}    # unshare(2) by ctypes, netns-lab's FibNet


def _marks(nodes) -> set[str]:
    """The names of the `pytest.mark.NAME` that the nodes hold."""
    return {n.attr for node in nodes for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "mark"}


def _is_fixture(node) -> bool:
    return any("fixture" in ast.unparse(d) for d in node.decorator_list)


def _makes_namespace(node, helpers: set[str], fixtures: set[str]) -> bool:
    """Whether node says an argv word that makes a namespace, calls what makes
    one or one of `helpers`, or (a test, a fixture) takes one of `fixtures`."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and n.value in NAMESPACE_WORDS:
            return True
        if isinstance(n, ast.Attribute) and n.attr in NAMESPACE_CALLS:
            return True
        if isinstance(n, ast.Name) and n.id in NAMESPACE_CALLS | helpers:
            return True
    return isinstance(node, ast.FunctionDef) and (node.name.startswith("test_")
                                                  or _is_fixture(node)) \
        and any(a.arg in fixtures for a in node.args.args)


def _makers(*trees) -> tuple[set[str], set[str]]:
    """The top-level helpers (functions, classes) and fixtures of trees (a test
    module, conftest.py) that make a namespace, themselves or through one another."""
    defs = [n for tree in trees for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    helpers: set[str] = set()
    fixtures: set[str] = set()
    while more := [d for d in defs if d.name not in helpers | fixtures
                   and _makes_namespace(d, helpers, fixtures)]:
        for d in more:
            (fixtures if _is_fixture(d) else helpers).add(d.name)
    return helpers, fixtures


def test_every_test_that_makes_a_namespace_is_marked_so():
    """Also one that makes it through a fixture or a helper (FibNet, a thread
    that unshares): the words alone let test_announce.py's tests into `make
    unit` with its module's mark gone."""
    unmarked = []
    conftest = ast.parse((TESTS / "conftest.py").read_text())
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        making, fixtures = _makers(tree, conftest)
        module = _marks(n.value for n in tree.body if isinstance(n, ast.Assign)
                        and any(getattr(t, "id", None) == "pytestmark" for t in n.targets))
        helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for fn in ast.walk(tree):
            if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")):
                continue
            # a decorator of the module's own (test_top's lab_test) may apply the mark
            own = [helpers[d.id] for d in fn.decorator_list
                   if isinstance(d, ast.Name) and d.id in helpers]
            if _makes_namespace(fn, making, fixtures) and not \
                    (module | _marks([*fn.decorator_list, *own])) & ISOLATED:
                unmarked.append(f"{path.name}::{fn.name}")
    assert unmarked == [], unmarked


def test_every_test_file_is_in_the_readme_and_developers_md():
    """Their lists of what each test file covers (DEVELOPERS.md may name a
    pattern, `test_lab*.py`) go with the files: each file is named, and each
    name is a file's (not one renamed or removed)."""
    files = [path.name for path in sorted(TESTS.glob("test_*.py"))]
    for doc, heading in (("README.md", "\n## Tests\n"),
                         ("DEVELOPERS.md", "\n## Tests, by layer\n")):
        text = (TESTS.parent / doc).read_text()
        section = text[text.index(heading) + len(heading):].split("\n## ")[0]
        named = re.findall(r"\b(test_[\w*]*\.py)\b", section)
        unnamed = [name for name in files if not any(fnmatch.fnmatch(name, n) for n in named)]
        assert unnamed == [], doc
        stale = [n for n in named if not fnmatch.filter(files, n)]
        assert stale == [], doc


# Run with conftest.py as a plugin, its bound made 1 s, and its repeat.
HANGS = """
import threading
import conftest

conftest.UNIT_BOUND = conftest.AGAIN = 1


def test_waits_for_ever():
    threading.Thread(target=threading.Event().wait, name="stand-in", daemon=True).start()
    try:
        threading.Event().wait()
    finally:                    # and again as it unwinds
        threading.Event().wait()


def test_next():
    pass
"""


def test_a_test_that_hangs_fails_with_every_threads_stack(tmp_path):
    """One run of the unit tests hung until it was killed by hand, after 10
    minutes, and nothing said where: a test past its bound fails instead,
    with the stack of each thread (also one that hangs again on its way
    out), and the run goes on."""
    (tmp_path / "test_hangs.py").write_text(HANGS)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "conftest", "test_hangs.py"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(TESTS)},
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines()[-1].startswith("1 failed, 1 passed"), r.stdout + r.stderr
    assert "still running after 1 s: hung?" in r.stdout
    assert re.search(r"thread stand-in:\n(.*\n)*.* in wait\n", r.stdout), r.stdout
    assert re.search(r"thread MainThread:\n(.*\n)*.* in test_waits_for_ever\n", r.stdout), \
        r.stdout
