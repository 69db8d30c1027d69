"""The control socket's directory and its lock (ctl.py), and the client that
the commands use against a stand-in for the instance on the real socket, under
a temporary RUN_DIR: no kernel; no root but for a listener of another user."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from xlb import ctl


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A RUN_DIR of the test's own (test_top.py's stand-ins use it too)."""
    monkeypatch.setattr(ctl, "RUN_DIR", tmp_path / "run")
    # No other instance: one that runs in this machine's own namespace (its
    # directory has the same name) is not this test's.
    monkeypatch.setattr(ctl, "holder", lambda: None)
    monkeypatch.setattr(ctl, "_earlier_instance", lambda timeout=2.0: None)
    return tmp_path / "run"


pytestmark = pytest.mark.usefixtures("run_dir")


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


@pytest.mark.parametrize("removed", ["socket", "directory"])
def test_a_listener_whose_socket_is_gone_makes_it_again_where_clients_look(removed):
    """Its socket file removed, in the directory it holds, or with its
    directory: lost, then restored, a client reaches it again."""
    listener = ctl.Listener()
    try:
        os.unlink(ctl.address())
        if removed == "directory":
            ctl.directory().rmdir()
        assert listener.lost()
        sock = listener.restore()
        assert not listener.lost()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(ctl.address())
            sock.accept()[0].close()
    finally:
        listener.close()


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



# --- the client (ctl.request) against a stand-in for the instance ---------------------

UNANSWERED = "^the instance closed the connection without answering$"
EARLIER_INSTANCE = ctl._earlier_instance      # run_dir replaces it


class Clock:
    """ctl's time, made up: a sleep passes at once (and calls `on_sleep`)."""

    def __init__(self, monkeypatch, on_sleep=lambda: None):
        self.now, self.on_sleep = 100.0, on_sleep
        monkeypatch.setattr(ctl, "time", self)

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_sleep()


@contextlib.contextmanager
def serving(handle, connections: int = 1, stops: bool = False):
    """A stand-in for the running instance on its real socket (ctl.Listener):
    a thread hands each of `connections` connections to `handle`; then, if
    it `stops`, it is gone (as an instance that `xlb down` stopped)."""
    listener = ctl.Listener()

    def serve():
        for _ in range(connections):
            conn, _ = listener.socket.accept()
            with conn:
                handle(conn)
        if stops:
            listener.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield
    finally:
        server.join(10)
        if not stops:
            listener.close()


@contextlib.contextmanager
def answering(answer, stops: bool = False):
    """An instance that reads one request, a JSON line as the daemon reads it,
    and answers with what `answer(request)` returns, as a JSON line (None:
    it closes unanswered); then, if it `stops`, it is gone. Yields the
    requests it read."""
    read = []

    def handle(conn):
        with conn.makefile("rb") as f:
            read.append(json.loads(f.readline()))
        reply = answer(read[-1])
        if reply is not None:
            conn.sendall(json.dumps(reply).encode() + b"\n")

    with serving(handle, stops=stops):
        yield read


def test_a_request_is_a_json_line_with_its_deadline_and_the_answer_its_result(monkeypatch):
    """The deadline is on the client's clock, which the instance shares: it
    does nothing that it reads after the client gave up."""
    Clock(monkeypatch)
    with answering(lambda req: {"ok": True, "result": {"pid": 4242}}) as read:
        assert ctl.request("server", timeout=7.0, action="drain", pool="was") == {"pid": 4242}
    assert read == [{"cmd": "server", "action": "drain", "pool": "was", "deadline": 107.0,
                     "progress": True}]


def test_a_request_the_instance_has_begun_is_waited_for_past_its_timeout():
    """Its timeout is for its turn, and the change gets as long again: told
    so past it, the client said the instance "did not answer" of a change
    that took effect. An instance that never finishes it is not waited for
    for ever (`xlb ha follow` would stop following), and the client says
    what it knows."""
    def handle(conn, answer=True):
        with conn.makefile("rb") as f:
            req = json.loads(f.readline())
        while time.monotonic() < req["deadline"] - 1.5:       # queued
            time.sleep(0.01)
        conn.sendall(ctl.BEGUN)
        while time.monotonic() < req["deadline"] + 0.5:       # the change takes long
            time.sleep(0.01)
        if answer:
            conn.sendall(json.dumps({"ok": True, "result": "done"}).encode() + b"\n")
        else:
            time.sleep(3)

    with serving(handle):
        assert ctl.request("server", timeout=2.5) == "done"
    with serving(lambda conn: handle(conn, answer=False)):
        with pytest.raises(ctl.ControlError, match=r"^the instance began this change and has "
                           r"not finished it within 2.5 s: it may yet take effect"):
            ctl.request("server", timeout=2.5)


def test_a_refusal_is_a_control_error_that_says_why():
    """As the daemon answers: an invalid config lists its problems and is the
    request's fault (bad_input: exit 2); an internal error is not."""
    invalid = {"ok": False, "error": "invalid config: nothing applied", "bad_input": True,
               "problems": [["pools.was.servers[2]", "no server 'was3'"]]}
    with answering(lambda req: invalid):
        with pytest.raises(ctl.ControlError, match="^invalid config: nothing applied$") as e:
            ctl.request("apply", text="", path="/etc/xlb.toml")
    assert (e.value.problems, e.value.bad_input) == (invalid["problems"], True)
    with answering(lambda req: {"ok": False, "error": "internal error: KeyError('x')"}):
        with pytest.raises(ctl.ControlError, match=r"^internal error: KeyError\('x'\)$") as e:
            ctl.request("status")
    assert (e.value.problems, e.value.bad_input) == ([], False)


def test_an_instance_that_closes_without_answering_is_a_control_error():
    with answering(lambda req: None):
        with pytest.raises(ctl.ControlError, match=UNANSWERED):
            ctl.request("status")


def test_an_instance_that_resets_the_connection_is_a_control_error():
    """Stopping, it closes the connections it has not read: the client's is reset."""
    def unread(conn):
        select.select([conn], [], [])          # the request came, and stays unread
    with serving(unread):
        with pytest.raises(ctl.ControlError, match=UNANSWERED):
            ctl.request("status")


STOPPING = b'{"ok": false, "error": "xlb is stopping: not done", "stopping": true}\n'


def test_an_instance_that_ended_before_it_answered_is_not_running():
    """Cut off by a stop's last moments (or killed), the client said "closed
    the connection without answering" of an instance that none runs now."""
    listener = ctl.Listener()

    def stop():
        conn, _ = listener.socket.accept()
        with conn:
            conn.recv(65536)
            listener.close()            # gone before the client looks again
    server = threading.Thread(target=stop, daemon=True)
    server.start()
    with pytest.raises(ctl.Ended, match="^the instance ended before it answered; no xlb "
                                        "instance runs in this network namespace now$"):
        ctl.request("apply", text="", path="/etc/xlb.toml")
    server.join(10)


def test_an_instance_that_cuts_off_a_request_as_it_stops_is_stopping():
    """Asked again, it says it stops: the request was not done."""
    def unanswered_then_stopping(conn):
        if conn.recv(65536).startswith(b'{"cmd": "ping"'):
            conn.sendall(STOPPING)
    with serving(unanswered_then_stopping, connections=2):
        with pytest.raises(ctl.Stopping, match="^xlb is stopping: not done$"):
            ctl.request("status")


@pytest.mark.parametrize("select_socket", [True, False], ids=["while-open", "as-it-closes"])
def test_a_stopping_instance_answers_each_client_until_its_socket_is_closed(monkeypatch,
                                                                          select_socket):
    """Its loop ended, it accepted no more while it detached: a client waited,
    unread, until the close reset it ("closed the connection without
    answering"), or its timeout. It is told at once, also one queued before;
    those the backlog holds as the socket closes are told too (as-it-closes:
    the refusing thread is kept from seeing any before)."""
    if not select_socket:
        monkeypatch.setattr(ctl, "select", types.SimpleNamespace(
            select=lambda r, w, x: select.select(r[1:], w, x)))
    listener = ctl.Listener()
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        queued.connect(ctl.address())
        queued.sendall(b'{"cmd": "status"}\n')
        listener.refuse(STOPPING)
        if select_socket:
            with pytest.raises(ctl.Stopping, match="^xlb is stopping: not done$"):
                ctl.request("server", action="drain", pool="was", server="was1")
    finally:
        listener.close()
    with queued:
        assert queued.makefile("rb").readline() == STOPPING


def test_an_answer_before_the_request_was_read_is_the_answer():
    """The instance refuses an oversized request before it has read it all,
    and closes: the client's send fails (EPIPE), the answer is still read."""
    oversized = {"ok": False, "error": "malformed or oversized request (limit 8388608 bytes)"}
    with serving(lambda conn: conn.sendall(json.dumps(oversized).encode() + b"\n")):
        with pytest.raises(ctl.ControlError, match=r"^malformed or oversized request"):
            ctl.request("apply", text="#" * ctl.MAX_REQUEST, path="/etc/xlb.toml")


@pytest.mark.parametrize("left", ["nothing", "a socket nothing listens on", "a file as RUN_DIR"])
def test_where_nothing_listens_no_instance_runs(run_dir, left):
    """A crashed instance's socket file refuses connections: not running."""
    if left == "a socket nothing listens on":
        ctl.directory().mkdir(0o700, parents=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
            crashed.bind(ctl.address())
    elif left == "a file as RUN_DIR":
        run_dir.write_text("")
    with pytest.raises(ctl.NotRunning):
        ctl.request("status")
    assert not ctl.running()


def test_a_stopping_instance_is_still_running():
    """`xlb down` waits until nothing listens: one that closes unanswered still does."""
    with answering(lambda req: None):
        assert ctl.running()


def test_an_instance_whose_socket_is_gone_is_waited_for_then_named(monkeypatch):
    """It holds its directory's lock, so it runs; its socket is gone (its
    directory removed): the client gives it 3 s to make it again, then says
    which process it is."""
    monkeypatch.setattr(ctl, "holder", lambda: 4242)
    clock = Clock(monkeypatch)
    with pytest.raises(ctl.ControlError, match=(
            rf"^xlb runs here \(pid 4242\), but its control socket {re.escape(ctl.address())} "
            r"is gone and it has not made it again \(its log says why\); `kill -TERM 4242`")):
        ctl.request("status", timeout=10.0)
    assert 103.0 < clock.now < 103.2


def test_a_socket_made_again_while_the_client_waits_is_asked(monkeypatch):
    """The instance looks every second whether its socket is gone."""
    monkeypatch.setattr(ctl, "holder", lambda: 4242)
    looks = []
    with contextlib.ExitStack() as restored:
        def look():
            looks.append(None)
            if len(looks) == 5:
                monkeypatch.setattr(ctl, "holder", lambda: None)    # the stand-in's start asks
                restored.enter_context(answering(lambda req: {"ok": True, "result": "pong"}))

        Clock(monkeypatch, on_sleep=look)
        assert ctl.request("ping") == "pong"
    assert len(looks) == 5


def test_an_instance_whose_backlog_is_full_is_waited_for(monkeypatch):
    """Starting (compiling), the instance accepts no connection yet: a client
    beyond its listen backlog was refused at once ("Resource temporarily
    unavailable", exit 1), where the others wait for it to serve."""
    listener, queued = ctl.Listener(), []
    try:
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(ctl.address())
            except BlockingIOError:
                client.close()
                break
            queued.append(client)

        def answer_one():
            conn, _ = listener.socket.accept()
            with conn, conn.makefile("rb") as f:
                f.readline()
                conn.sendall(b'{"ok": true, "result": "pong"}\n')
        server = threading.Thread(target=answer_one, daemon=True)

        def serve():             # once the client waits: the queue is taken, then it is served
            if server.ident is None:
                for _ in queued:
                    listener.socket.accept()[0].close()
                server.start()

        Clock(monkeypatch, on_sleep=serve)
        assert ctl.request("ping") == "pong"
        server.join(10)
    finally:
        for client in queued:
            client.close()
        listener.close()


# A listener at the abstract name of an earlier build (ctl.EARLIER): prints the
# request it reads, answers as xlb does.
EARLIER_BUILD = r"""
import contextlib, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1])
s.listen()
print("listening", flush=True)
c, _ = s.accept()
with c, c.makefile() as f, contextlib.suppress(BrokenPipeError):
    print(f.readline().strip() or "nothing", flush=True)
    c.sendall(b'{"ok": true, "result": "stopping"}\n')
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a listener of another user")
@pytest.mark.parametrize(("user", "asked"), [(0, True), (65534, False)])
def test_an_earlier_builds_instance_is_asked_only_if_root(monkeypatch, user, asked):
    """Any user may bind its abstract name: another's listener is told nothing."""
    name = f"xlb-test-{os.getpid()}/control"       # not the real one: other runs use it
    monkeypatch.setattr(ctl, "EARLIER", "\0" + name)
    monkeypatch.setattr(ctl, "_earlier_instance", EARLIER_INSTANCE)
    earlier = subprocess.Popen(["/usr/bin/python3", "-c", EARLIER_BUILD, name], user=user,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert earlier.stdout.readline() == "listening\n"
        if asked:
            assert ctl.request("down", keep_datapath=True) == "stopping"
        else:
            with pytest.raises(ctl.NotRunning):
                ctl.request("down", keep_datapath=True)
        read = earlier.communicate(timeout=10)[0]
    finally:
        earlier.kill()
        earlier.wait()
    if asked:
        assert json.loads(read)["cmd"] == "down"
    else:
        assert read == "nothing\n"


def test_exclusive_keeps_an_instance_from_starting_and_waits_for_none(run_dir):
    """What `xlb down` removes of a dead instance it removes holding the lock
    an `xlb up` takes: one that starts meanwhile is refused, and beside one
    that started first, exclusive is refused; the socket file a killed
    instance left goes with the directory."""
    with ctl.exclusive():
        with pytest.raises(ctl.AlreadyRunning):
            ctl.Listener()
    assert list(run_dir.iterdir()) == []
    listener = ctl.Listener()
    with pytest.raises(ctl.AlreadyRunning):
        with ctl.exclusive():
            pass
    assert os.path.exists(ctl.address())     # a running instance's socket stays
    listener.socket.close()
    os.close(listener._dirfd)         # killed: its socket file is left
    assert os.path.exists(ctl.address())
    with ctl.exclusive():
        pass
    assert list(run_dir.iterdir()) == []


# In a network namespace of its own (other runs' `xlb` would take the lock for
# an instance's), children lock directories as a running instance does: one of
# another name, one by this namespace's name from another namespace, one by
# this namespace's name that another user made (private) in a directory anyone
# may write, then one by this namespace's name, which is then removed; what
# holder() says at each step, and when this process holds the lock itself.
HOLDERS = r"""
import ctypes, fcntl, json, os, sys, tempfile
from pathlib import Path
from xlb import ctl
ctl.RUN_DIR = Path(sys.argv[1])
def locked(path):
    os.makedirs(path.parent, exist_ok=True)
    os.makedirs(path, 0o700, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd
def holding(path, elsewhere=False, user=None):
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        if elsewhere and ctypes.CDLL(None).unshare(0x40000000) != 0:    # CLONE_NEWNET
            os._exit(1)
        if user is not None:
            os.setgid(user)
            os.setuid(user)
        locked(path)
        os.write(ready[1], b"!")
        os.read(go[0], 1)
        os._exit(0)
    assert os.read(ready[0], 1) == b"!"
    return pid, lambda: (os.write(go[1], b"!"), os.waitpid(pid, 0))
anyones = Path(tempfile.mkdtemp(dir="/tmp"))
anyones.chmod(0o1777)
said = []
for path, elsewhere, user in ((ctl.RUN_DIR / "netns-other", False, None),
                              (ctl.directory(), True, None),
                              (anyones / ctl.directory().name, False, 65534)):
    _, release = holding(path, elsewhere, user)
    said.append(ctl.holder())
    release()
os.rmdir(anyones / ctl.directory().name)
anyones.rmdir()
pid, release = holding(ctl.directory())
said.append(ctl.holder() == pid)
os.rmdir(ctl.directory())
said.append(ctl.holder() == pid)
release()
fd = locked(ctl.directory())
said.append(ctl.holder())
print(json.dumps(said))
"""


# A child locks many directories (of other names) and holds them; how often
# holder() lists its descriptors.
MANY_LOCKS = r"""
import fcntl, os, sys
from xlb import ctl
ready, go = os.pipe(), os.pipe()
pid = os.fork()
if pid == 0:
    for i in range(200):
        path = os.path.join(sys.argv[1], str(i))
        os.mkdir(path)
        fcntl.flock(os.open(path, os.O_RDONLY | os.O_DIRECTORY), fcntl.LOCK_EX)
    os.write(ready[1], b"!")
    os.read(go[0], 1)
    os._exit(0)
assert os.read(ready[0], 1) == b"!"
listed, listdir = [], os.listdir
os.listdir = lambda path: listed.append(path) or listdir(path)
said = ctl.holder()
os.write(go[1], b"!")
os.waitpid(pid, 0)
print(said, listed.count(f"/proc/{pid}/fd"))
"""


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace of its own")
def test_holder_looks_at_each_process_once_however_many_locks_it_holds(tmp_path):
    """Any user may hold thousands of locks: holder() listed the holder's
    descriptors once for each, and 3,000 made `xlb status` (with no instance)
    and `xlb up`'s start take 47 s."""
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", MANY_LOCKS, str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "1"]


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace of its own")
def test_holder_is_the_process_here_that_locked_this_namespaces_directory(tmp_path):
    """Also once the directory is removed; not a lock of another name, nor of
    another namespace, nor of another user's directory (which kept `xlb up`
    from starting), nor this process's own."""
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", HOLDERS, str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [None, None, None, True, True, None]
