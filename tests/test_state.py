"""xlb's own state directory: no kernel; root only to name a namespace."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from xlb import state
from xlb.state import State

KEPT = State("/etc/xlb/xlb.toml", '[pools.web]\nservers = ["was1"]\n',
             {("web", "was1"): "drain", ("web", "was2"): "maint"}, "backup", 100, 4242,
             {("web", "was1"): 3, ("web", "was2"): 0})


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path))
    return tmp_path


def test_directory_is_per_network_namespace(root):
    assert state.directory() == root / f"netns-{os.stat('/proc/self/ns/net').st_ino}"


def test_save_then_load_gives_it_back_and_clear_forgets_it(root):
    assert state.load() is None
    state.save(KEPT)
    assert state.load() == KEPT
    assert os.listdir(state.directory()) == ["state.json"]      # no temporary file left
    assert state.directory().stat().st_mode & 0o777 == 0o700
    state.save(State(None, "", {}))
    assert state.load() == State(None, "", {})
    state.clear()
    assert state.load() is None and not state.directory().exists()
    state.clear()                                                # twice is fine


def test_follow_s_record_is_the_role_of_the_keepalived_that_said_it(root):
    """What a reloading keepalived's next `xlb ha follow` takes up: only the
    same keepalived process's last word, beside the state, not in it."""
    assert state.followed("100 5 xlb") is None
    state.save_followed("100 5 xlb", "active")
    assert state.followed("100 5 xlb") == "active"
    assert state.followed("100 6 xlb") is None          # the pid, reused by another process
    state.save_followed("100 5 xlb", "backup")
    assert state.followed("100 5 xlb") == "backup"
    # Left by a follow that runs on, or was killed: keepalived may have said more since.
    state.save_followed("100 5 xlb", "active", running=True)
    assert state.followed("100 5 xlb") is None
    assert state.load() is None and sorted(os.listdir(state.directory())) == ["keepalived.json"]
    (state.directory() / "keepalived.json").write_text('{"keepalived": "100 5 xlb", "role": 1}')
    assert state.followed("100 5 xlb") is None


def rewrite(drop: tuple[str, ...] = (), **changes) -> None:
    path = state.directory() / "state.json"
    d = json.loads(path.read_text())
    namespace = ("boot_id", "cookie", "name")
    for key in drop:
        del (d["namespace"] if key in namespace else d)[key]
    for key, value in changes.items():
        (d["namespace"] if key in namespace else d)[key] = value
    path.write_text(json.dumps(d))


def test_an_earlier_namespace_with_the_same_inode_is_not_this_one(root, capsys):
    """Ignored, and said: a bare `xlb up` refers to what load said of the
    file it cannot take, and the drain and maint states it held are lost."""
    state.save(KEPT)
    cookie = json.loads((state.directory() / "state.json").read_text())["namespace"]["cookie"]
    rewrite(cookie=cookie + 1)
    assert state.load() is None
    assert "left by an earlier network namespace that had this one's inode (deleted since)" \
        in capsys.readouterr().err


def test_after_a_reboot_the_state_is_taken(root):
    state.save(KEPT)
    rewrite(boot_id="00000000-0000-0000-0000-000000000000", cookie=12345)
    assert state.load() == KEPT
    rewrite(drop=("name",))                     # by an earlier build: as before
    assert state.load() == KEPT


def test_after_a_reboot_another_namespaces_state_at_this_inode_is_not_taken(root, monkeypatch,
                                                                            capsys):
    """Namespaces made anew at boot get inodes in the order they are made:
    lb2 may get the one lb1 had, and lb1's state is not lb2's config."""
    monkeypatch.setattr(state, "_netns_name", lambda: "lb1")
    state.save(KEPT)
    rewrite(boot_id="00000000-0000-0000-0000-000000000000", cookie=12345)
    monkeypatch.setattr(state, "_netns_name", lambda: "lb2")
    assert state.load() is None
    assert "left before the reboot by the network namespace lb1, not this one (lb2)" \
        in capsys.readouterr().err
    monkeypatch.setattr(state, "_netns_name", lambda: "lb1")
    assert state.load() == KEPT


def test_after_a_reboot_a_named_namespace_takes_a_state_that_names_none(root, monkeypatch):
    """A state by an earlier build, which kept no namespace's name: taken after
    a reboot in a namespace of any name, as before."""
    monkeypatch.setattr(state, "_netns_name", lambda: "lb1")
    state.save(KEPT)
    rewrite(boot_id="00000000-0000-0000-0000-000000000000", cookie=12345, drop=("name",))
    assert state.load() == KEPT


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace: needs root")
def test_a_namespace_is_named_as_ip_netns_names_it(tmp_path):
    import subprocess
    import sys
    subprocess.run(["ip", "netns", "add", "xlbt-named"], check=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", "xlbt-named", sys.executable, "-c",
                            "from xlb import state; print(state._netns_name())"],
                           capture_output=True, text=True, check=True)
        assert r.stdout == "xlbt-named\n"
    finally:
        subprocess.run(["ip", "netns", "del", "xlbt-named"], check=True)
    assert state._netns_name() is None              # the root namespace, no name


@pytest.mark.parametrize("damage", ["", "{", "[]", '{"config_path": 1}'])
def test_a_damaged_state_is_a_warning_not_a_failure(root, capsys, damage):
    state.directory().mkdir()
    (state.directory() / "state.json").write_text(damage)
    assert state.load() is None
    assert "level=warning event=state" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [b'{"config_path": "/etc/xlb/caf\xe9.toml"}',   # a bad byte
                                    b"\xff" * 64,
                                    b"[" * 100000])          # nested past Python's stack
def test_a_state_of_bad_bytes_or_nested_too_deep_is_a_warning_not_a_failure(root, capsys,
                                                                            damage):
    """Not UTF-8 (a flipped bit, an editor's Latin-1), or nesting Python's
    parser cannot follow: every `xlb up`, `xlb down` and keepalived's follow
    read it, and none may fail on it, nor a systemd restart loop start."""
    state.directory().mkdir()
    (state.directory() / "state.json").write_bytes(damage)
    (state.directory() / "keepalived.json").write_bytes(damage)
    assert state.load() is None
    assert "not an xlb state" in capsys.readouterr().err
    assert state.followed("100 5 xlb") is None


# A whole state but for one field: '{"config_path": 1}' above is refused for the
# namespace it lacks, before its config_path is looked at.
@pytest.mark.parametrize("field,value", [("config_path", 1), ("config_text", None),
                                         ("admin", [["web", "was1", "up"]]),
                                         ("admin", [[1, "was1", "drain"], ["web", "w", "maint"]]),
                                         ("role", "primary"), ("announce_table", "100"),
                                         ("announce_table", True), ("announce_table", 254),
                                         ("datapath", "12"), ("datapath", 1.5),
                                         ("backends", [["web", "was1", "3"]]),
                                         ("backends", [["web", "was1"]])])
def test_a_state_with_an_unknown_server_state_role_or_table_is_refused(root, capsys, field,
                                                                       value):
    state.save(KEPT)
    rewrite(**{field: value})
    assert state.load() is None
    assert "not an xlb state" in capsys.readouterr().err


@pytest.mark.parametrize("field,none", [("role", None), ("announce_table", None),
                                        ("datapath", None), ("backends", {})])
def test_a_state_saved_before_the_role_table_datapath_or_ids_were_kept_has_none(root, field,
                                                                                none):
    state.save(KEPT)
    rewrite(drop=(field,))
    assert state.load() == dataclasses.replace(KEPT, **{field: none})


@pytest.mark.parametrize("mode", [0o777, 0o720, 0o702])     # anyone, the group, the others
def test_a_directory_others_may_write_is_refused(root, tmp_path, capsys, mode):
    """What another user could put there (a symbolic link where xlb writes its
    temporary file, a forged state) must not steer root: nothing written, nothing taken."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state.save(KEPT)
    state.directory().chmod(mode)
    (state.directory() / f".state.json.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(OSError, match=rf"is not xlb's own: owned by uid \d+, mode {mode:o}$"):
        state.save(State(None, "", {}))
    assert victim.read_text() == "precious\n"
    assert state.load() is None
    assert "is not xlb's own" in capsys.readouterr().err


def test_a_symbolic_link_at_the_directory_is_not_followed(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state.directory().symlink_to(elsewhere)
    with pytest.raises(OSError):
        state.save(KEPT)
    assert os.listdir(elsewhere) == []


def test_the_state_file_is_the_owner_s_alone(root):
    state.save(KEPT)
    assert (state.directory() / "state.json").stat().st_mode & 0o777 == 0o600


def test_a_bare_xlb_up_takes_over_the_saved_config(root, monkeypatch):
    """`xlb up` with no option: the config the last instance ran, and its file."""
    import click
    from click.testing import CliRunner

    from xlb import cli, config

    with pytest.raises(click.ClickException, match="nothing to serve") as e:
        cli.saved_config()
    assert e.value.exit_code == 2
    # As root: a bare `xlb up` checks for root first, and `make unit` runs as anyone.
    with monkeypatch.context() as m:
        m.setattr(cli.os, "geteuid", lambda: 0)
        r = CliRunner().invoke(cli.cli, ["up"])
    assert r.exit_code == 2 and "nothing to serve" in r.output

    text = ('[servers.was1]\naddress = "10.1.11.101"\nport = 8080\n\n'
            '[pools.web]\nservers = ["was1"]\n\n'
            '[frontends.www]\nvip = "10.1.1.101"\nport = 80\npool = "web"\n')
    state.save(State("/etc/xlb/xlb.toml", text, {}))
    cfg, path = cli.saved_config()
    assert cfg == config.load(text) and str(path) == "/etc/xlb/xlb.toml"

    state.save(State(None, text.replace('pool = "web"', 'pool = "nosuch"'), {}))
    with pytest.raises(click.ClickException, match="saved by the earlier instance is invalid"):
        cli.saved_config()

    # One it cannot take (damaged) is said to be there, and how to forget it.
    (state.directory() / "state.json").write_text("{")
    with pytest.raises(click.ClickException, match=r"the state file left here cannot be "
                                                   r"taken, as said above; `xlb down` forgets"):
        cli.saved_config()


def test_a_bare_xlb_up_of_another_user_is_told_it_needs_root(root, monkeypatch):
    """The config to take over is in root's state directory, which no other
    user may read: "nothing to serve" (or that directory's "Permission
    denied") would be no answer; the missing root is, with its exit 1."""
    from click.testing import CliRunner

    from xlb import cli
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    r = CliRunner().invoke(cli.cli, ["up"])
    assert (r.exit_code, r.output) == \
        (1, "Error: xlb up needs root, to load and attach XDP programs\n")


def test_a_saved_config_of_an_earlier_build_is_taken_over(root):
    """Its `dump` wrote a none monitor's check settings and every frontend's
    four timeouts (here an operator's, of the other protocol, which did
    nothing), which a file may no longer have: a bare `xlb up` after an
    upgrade takes the config all the same."""
    from xlb import cli, config
    checking = "interval = 5.0\ntimeout = 1.0\nrise = 2\nfall = 3\n"
    tcp, udp = "timeout_syn = 5\ntimeout_established = 30\ntimeout_closing = 7\n", \
        "timeout_udp = 9\n"

    def text(checking: str, www: str, dns: str) -> str:
        return ('[monitors.off]\ntype = "none"\n' + checking + '\n[servers.was1]\n'
                'address = "10.1.11.101"\nport = 8080\nmonitor = "off"\n\n[pools.web]\n'
                'servers = ["was1"]\n\n[frontends.www]\nvip = "10.1.1.101"\nport = 80\n'
                'pool = "web"\n' + www + '\n[frontends.dns]\nvip = "10.1.1.101"\nport = 53\n'
                'protocol = "udp"\npool = "web"\n' + dns)

    state.save(State(None, text(checking, tcp + udp, tcp + udp), {}))
    cfg, path = cli.saved_config()
    assert cfg == config.load(text("", tcp, udp)) and path is None


def test_a_save_that_fails_leaves_the_old_state_and_no_temporary_file(root, monkeypatch):
    """A full disk (ENOSPC at the write or the fsync): the old state stays, and
    the partial temporary file goes, neither holding the space nor keeping
    `xlb down` from removing the directory."""
    import errno
    state.save(KEPT)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(state.os, "fsync", full)
        with pytest.raises(OSError, match="No space left on device"):
            state.save(State(None, "", {}))
    assert os.listdir(state.directory()) == ["state.json"]
    assert state.load() == KEPT
    state.clear()
    assert not state.directory().exists()


def test_clear_removes_nothing_through_a_link_nor_in_a_directory_not_xlb_s(root, tmp_path):
    """`xlb down` forgets the state where load() and save() would use it, and
    nowhere else: not the state.json of the directory a symbolic link points
    to (another namespace's, say), nor what is in a directory another user may write."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "state.json").write_text("another namespace's\n")
    state.directory().symlink_to(elsewhere)
    state.clear()
    assert (elsewhere / "state.json").read_text() == "another namespace's\n"
    state.directory().unlink()
    state.save(KEPT)
    state.directory().chmod(0o777)
    state.clear()
    assert os.listdir(state.directory()) == ["state.json"]


def test_a_symbolic_link_at_the_directory_is_named_as_one(root, tmp_path, capsys):
    """An operator who moved the directory and left a link behind is told that,
    not "Not a directory" about a path that is one, as far as `ls` shows."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state.directory().symlink_to(elsewhere)
    with pytest.raises(OSError, match=r"is a symbolic link, which xlb does not follow$"):
        state.save(KEPT)
    (elsewhere / "state.json").write_text("{}")
    assert state.load() is None
    assert "is a symbolic link, which xlb does not follow" in capsys.readouterr().err


def test_a_kernel_without_netns_cookies_keeps_the_state_too(root, monkeypatch):
    """SO_NETNS_COOKIE is Linux 5.14's; the data path runs on earlier kernels
    (a fallback kernel booted after an update): there the state is saved and
    taken all the same (the cookie unknown), not every `xlb up` and `xlb down`
    failing with "Protocol not available"."""
    import errno
    import socket
    state.save(KEPT)                        # by this kernel: a cookie
    getsockopt = socket.socket.getsockopt

    def before_5_14(self, level, option, *args):
        if option == state.SO_NETNS_COOKIE:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return getsockopt(self, level, option, *args)
    monkeypatch.setattr(socket.socket, "getsockopt", before_5_14)
    rewrite(boot_id="00000000-0000-0000-0000-000000000000")     # booted since
    assert state.load() == KEPT
    state.save(dataclasses.replace(KEPT, role="active"))
    assert state.load() == dataclasses.replace(KEPT, role="active")
