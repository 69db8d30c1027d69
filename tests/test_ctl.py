"""The control socket's directory and its lock (ctl.py), under a temporary
RUN_DIR: no root, no kernel."""

from __future__ import annotations

import pytest

from xlb import ctl


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(ctl, "RUN_DIR", tmp_path / "run")
    # No other instance: one that runs in this machine's own namespace (its
    # directory has the same name) is not this test's.
    monkeypatch.setattr(ctl, "holder", lambda: None)
    monkeypatch.setattr(ctl, "_earlier_instance", lambda: None)
    return tmp_path / "run"


def test_a_stop_removes_the_directory_it_leaves_empty(run_dir):
    """Each stop would leave one directory more (a lab makes a namespace a run)."""
    ctl.Listener().close()
    assert list(run_dir.iterdir()) == []
    listener = ctl.Listener()
    (ctl.directory() / "kept").touch()    # not xlb's to remove
    listener.close()
    assert [p.name for p in ctl.directory().iterdir()] == ["kept"]


def test_a_start_beside_a_stopping_instance_listens_where_clients_look(monkeypatch):
    """The next `xlb up` opened the directory just as the last one removed it
    on its way out: it makes another, rather than listen in the removed one."""
    stopping = ctl.Listener()
    own_directory = ctl._own_directory

    def opened_then_removed():
        monkeypatch.setattr(ctl, "_own_directory", own_directory)
        fd = own_directory()
        stopping.close()
        return fd

    monkeypatch.setattr(ctl, "_own_directory", opened_then_removed)
    starting = ctl.Listener()
    try:
        assert not starting.lost()
    finally:
        starting.close()


def test_a_stop_leaves_a_directory_that_replaced_its_own(tmp_path):
    """Another's, empty as a start that is about to lock it leaves it."""
    listener = ctl.Listener()
    ctl.directory().rename(tmp_path / "moved")
    ctl.directory().mkdir(0o700)
    listener.close()
    assert ctl.directory().is_dir()


def test_a_start_refused_leaves_no_directory(run_dir, monkeypatch):
    """An instance runs here whose directory was removed: the one this start
    made goes again."""
    monkeypatch.setattr(ctl, "holder", lambda: 1234)
    with pytest.raises(ctl.AlreadyRunning):
        ctl.Listener()
    assert list(run_dir.iterdir()) == []
