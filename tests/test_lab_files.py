"""The operator's files are the operator's: `xlb apply` never writes a file it
was given, `xlb apply` alone reads the served file again, and what is in no
file (drain, maint) survives a restart in xlb's own state directory. In the
lab (prefix xlbo), with real traffic."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from labctl import SEED_ARGS, VIP, running_lab, xlb_ok

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

SERVERS = {"was1": ("10.1.11.101", 8080), "was2": ("10.1.11.102", 8080),
           "was1b": ("10.1.11.101", 8081)}


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbo") as lab:
        lab.web_server("was1", "WAS1B", 8081)      # a third server (lab.down ends it)
        yield lab


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Each test starts with no state: `xlb up` (started from here) inherits it."""
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def config(*members: str, comment: str = "") -> str:
    """The frontend www on VIP:80 over a pool of `members`, as an operator
    writes it: a comment, and no default spelled out (so it is not the
    canonical TOML that xlb writes)."""
    out = [f"# {comment or 'the operator writes this file'}"]
    for name in members:
        addr, port = SERVERS[name]
        out.append(f'[servers.{name}]\naddress = "{addr}"\nport = {port}\n')
    out.append(f'[pools.web]\nservers = {json.dumps(list(members))}\n')
    out.append(f'[frontends.www]\nvip = "{VIP}"\nport = 80\npool = "web"\n')
    return "\n".join(out)


def names(lab, count=12) -> dict:
    out = lab.client("client", "http", VIP, "80", "--count", str(count))
    assert out["errors"] == []
    return {n: out["names"].count(n) for n in set(out["names"])}


def on_disk(directory: Path) -> dict:
    """Every file in directory: its bytes, mtime and inode (a rewrite by
    rename changes the inode, a rewrite in place the mtime)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(directory.iterdir())}


def canonical(text: str) -> str:
    from xlb import config as configfile
    return configfile.dump(configfile.load(text))


def states(lab) -> dict:
    return {s["name"]: s["state"] for p in lab.status()["pools"] for s in p["servers"]}


@pytest.fixture
def etc(tmp_path) -> Path:
    """The operator's directory of config files."""
    (tmp_path / "etc").mkdir()
    return tmp_path / "etc"


def test_apply_a_then_b_then_a_runs_a_and_writes_no_file(lab, etc):
    start, a, b = etc / "xlb.toml", etc / "a.toml", etc / "b.toml"
    start.write_text(config("was1", "was2", comment="the file xlb up starts from"))
    a.write_text(config("was1", comment="A"))
    b.write_text(config("was2", comment="B"))
    before = on_disk(etc)
    with lab.xlb("--config", str(start)):
        assert lab.status()["config"] == str(start)
        for f, answers in ((a, {"WAS1": 12}), (b, {"WAS2": 12}), (a, {"WAS1": 12})):
            out = xlb_ok(lab, "apply", str(f))
            assert f"serving {f}" in out
            assert lab.status()["config"] == str(f)
            assert names(lab) == answers
        assert xlb_ok(lab, "show") == canonical(a.read_text())
        assert on_disk(etc) == before        # no file written, none added


def test_apply_alone_reads_the_served_file_again(lab, etc):
    start, other = etc / "xlb.toml", etc / "other.toml"
    start.write_text(config("was1", "was2"))
    with lab.xlb("--config", str(start)):
        start.write_text(config("was2", comment="edited"))         # edit, then apply
        before = on_disk(etc)
        out = xlb_ok(lab, "apply")
        assert f"applied {start}" in out
        assert names(lab) == {"WAS2": 12}
        # After `xlb apply FILE`, FILE is the one served and read again.
        other.write_text(config("was1"))
        xlb_ok(lab, "apply", str(other))
        other.write_text(config("was1b", comment="edited"))
        xlb_ok(lab, "apply")
        assert names(lab) == {"WAS1B": 12}
        assert lab.status()["config"] == str(other)
        assert on_disk(etc)["xlb.toml"] == before["xlb.toml"]


def test_apply_alone_needs_a_served_file(lab):
    with lab.xlb(*SEED_ARGS):
        r = lab.xlb_cmd("apply")
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and "serves no file" in r.stderr, r.stderr
        assert states(lab) == {"backend1": "up", "backend2": "up"}
    r = lab.xlb_cmd("apply")
    assert r.returncode == 1 and "no xlb instance runs" in r.stderr, r.stderr


def test_drain_and_maint_survive_a_restart_until_xlb_down(lab, tmp_path, state_dir):
    path = tmp_path / "xlb.toml"
    path.write_text(config("was1", "was2", "was1b"))
    with lab.xlb("--config", str(path)):
        xlb_ok(lab, "server", "drain", "web", "was1")
        xlb_ok(lab, "server", "disable", "web", "was1b")
    assert state_dir.is_dir()
    with lab.xlb("--config", str(path)) as x:
        assert states(lab) == {"was1": "drain", "was2": "up", "was1b": "maint"}
        assert names(lab) == {"WAS2": 12}
        # A server's state goes with `enable`, and all of it with `xlb down`.
        xlb_ok(lab, "server", "enable", "web", "was1b")
        xlb_ok(lab, "down")
        assert x.proc.wait(timeout=20) == 0        # it stops by itself
        x.stop()
        assert "event=restore" in x.stderr and "web/was1=drain" in x.stderr, x.stderr
    assert not state_dir.exists() or not any(state_dir.iterdir())
    with lab.xlb("--config", str(path)):
        assert states(lab) == {"was1": "up", "was2": "up", "was1b": "up"}


def test_drain_goes_with_a_renamed_pool_across_a_restart_that_adopts(lab, tmp_path, state_dir):
    """A restart that adopts the running data path (after a crash, or an
    upgrade) tells a server renamed, or in a renamed pool, by its address and
    port, as an apply does: its drain goes with it. A fresh start tells it by
    the saved config."""
    path, renamed = tmp_path / "xlb.toml", tmp_path / "renamed.toml"
    path.write_text(config("was1", "was2"))
    renamed.write_text(path.read_text().replace("[pools.web]", "[pools.www]")
                       .replace('pool = "web"', 'pool = "www"'))
    with lab.xlb("--config", str(path)) as x:
        xlb_ok(lab, "server", "drain", "web", "was1")
        x.stop(signal.SIGKILL)
    with lab.xlb("--config", str(renamed)) as x:
        assert "adopted the running data path" in x.serving_line
        assert lab.status()["pools"][0]["name"] == "www"
        assert states(lab) == {"was1": "drain", "was2": "up"}
        assert names(lab) == {"WAS2": 12}
        x.stop()                                # a clean stop: the next start is fresh
        assert 'event=restore servers="www/was1=drain"' in x.stderr, x.stderr
    with lab.xlb("--config", str(path)) as x:
        assert "adopted" not in x.serving_line
        assert states(lab) == {"was1": "drain", "was2": "up"}
        x.stop()
        assert 'level=info event=restore servers="web/was1=drain"\n' in x.stderr, x.stderr


def test_down_forgets_the_state_of_an_instance_stopped_by_a_signal(lab, tmp_path, state_dir):
    """A signal keeps the state for a restart; `xlb down` then forgets it, as
    it would with the instance running, and the next `xlb up` starts afresh.
    A state file it cannot take (damaged) it forgets too."""
    path = tmp_path / "xlb.toml"
    path.write_text(config("was1", "was2"))
    with lab.xlb("--config", str(path)):
        xlb_ok(lab, "server", "drain", "web", "was1")
    (kept,) = state_dir.iterdir()
    assert "forgot the state it left" in xlb_ok(lab, "down")
    assert not any(state_dir.iterdir())
    r = lab.xlb_cmd("down", timeout=60)
    assert r.returncode == 1 and "no xlb instance runs" in r.stderr, r.stderr
    # One it cannot take (damaged: every start would warn of it) goes too.
    kept.mkdir(mode=0o700)
    (kept / "state.json").write_text("{")
    assert f"forgot the state file it could not take ({kept / 'state.json'})" in \
        xlb_ok(lab, "down")
    assert not any(state_dir.iterdir())
    with lab.xlb("--config", str(path)):
        assert states(lab) == {"was1": "up", "was2": "up"}


def test_the_labs_teardown_takes_the_state_of_its_namespaces(state_dir):
    """Stopped by a signal, xlb keeps its state for a restart; the lab's
    teardown deletes the namespace, and xlb's state there with it (no
    directory of a namespace that is gone piles up)."""
    with running_lab("xlbq") as lab:
        with lab.xlb(*SEED_ARGS):
            pass
        assert any(state_dir.iterdir())
    assert not any(state_dir.iterdir())
