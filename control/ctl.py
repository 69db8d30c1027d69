"""The control socket: how `xlb status` and `xlb down` reach the instance that
runs in this network namespace.

A Unix socket, `/run/xlb/netns-<inode of /proc/self/ns/net>/control.sock`:
one directory per network namespace, so instances in different namespaces
never see each other. /run is the same for every command in a namespace (`ip
netns exec` makes /sys its own, not /run), and only root may create or enter
/run/xlb (0700): no other user can connect, nor take the name first and keep
`xlb up` from starting. The one-instance lock is a flock of the namespace's
directory, which a crash releases; so a socket file a crash left behind is
replaced by the next `xlb up`, and until then refuses connections. A stop
removes the directory it leaves empty (_let_go).

The lock outlives its directory's name: an instance whose directory was
removed (`rm -rf /run/xlb`) or replaced still holds it, and is found by it
(holder()): a client waits for the instance to make its socket again (it looks
every second), and `xlb up` refuses to start beside it.

An instance of a build before this one listens at the abstract name
`@xlb/control` instead (EARLIER): the commands reach it there, so that an
upgrade can hand over (`xlb down --keep-datapath`, then the new `xlb up`), and
`xlb up` does not start beside it. Any user may bind that name, so only a
listener that runs as root is taken for xlb; another is ignored and told
nothing.

Protocol: one JSON object per line each way, one request per connection;
before its answer, a request that asks for it ("progress") and changes
something is told when the instance begins to carry it out (BEGUN), and
waited for from then on as long again as for its turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .config import MAX_FILE
from .state import PRIVATE, alone, namespace_dirname, open_own

RUN_DIR = Path("/run/xlb")
SOCKET = "control.sock"
REMOVING = "removing"      # there while `xlb down` removes what a dead instance left
# An apply carries a config file of up to MAX_FILE bytes, which JSON writes up
# to six times as long (a control character as \u0000: such a file is the
# instance's to refuse with its line and column), and the file's name.
MAX_REQUEST = 6 * MAX_FILE + (1 << 20)
ROOT_ONLY = "permission denied: the control socket is root-only"
EARLIER = "\0xlb/control"  # where an instance of a build before the file socket listens
RESTORE_WAIT = 3.0       # seconds a client waits for a running instance to make its socket again
# What the instance answers first, to a request that asks for it ("progress"),
# once it carries the request out: no longer queued, not to be given up.
BEGUN = b'{"begun": true}\n'


class NotRunning(Exception):
    def __init__(self, message: str = "no xlb instance runs in this network namespace"):
        super().__init__(message)


class AlreadyRunning(Exception):
    def __init__(self):
        super().__init__("xlb is already running in this network namespace "
                         "(see `xlb status`; stop it with `xlb down`)")


class ControlError(Exception):
    """The instance refused or failed a request; the message says why,
    `problems` lists (key path, reason) pairs for an invalid config, and
    `bad_input` says the request was wrong (the CLI's exit 2), not the instance."""

    def __init__(self, message: str, problems: list | None = None, bad_input: bool = False):
        super().__init__(message)
        self.problems = problems or []
        self.bad_input = bad_input


class Stopping(ControlError):
    """The instance is stopping (a signal, `xlb down`): it refused the request, not done.
    `pid`: its process (None: an earlier build's instance does not say)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class Ended(NotRunning):
    """The instance ended (it stopped, or was killed) before it answered, and
    none runs now: the request was not read if it stopped."""

    def __init__(self):
        super().__init__("the instance ended before it answered; no xlb instance runs in "
                         "this network namespace now")


def directory() -> Path:
    return RUN_DIR / namespace_dirname()


def address() -> str:
    return str(directory() / SOCKET)


class Listener:
    """This namespace's control socket, bound and listening, and the lock that
    makes its instance the only one; close() gives both up."""

    def __init__(self):
        self._dirfd, self.socket, self._file = _claim()
        self._refusing: tuple[threading.Thread, socket.socket] | None = None

    def lost(self) -> bool:
        """True when clients no longer find this socket where they look for
        it: its file, or its directory, was removed or replaced."""
        try:
            st = os.stat(address())
        except OSError:
            return True
        return not _same(st, self._file)

    def restore(self) -> socket.socket:
        """Makes the socket again where clients look for it, and returns it
        (listening); the old one is closed. Raises as Listener() does, when it
        cannot (yet): the old lock is given up only once the new one is held."""
        dirfd, sock, file = _claim(self._dirfd)
        if dirfd != self._dirfd:
            os.close(self._dirfd)
        self.socket.close()
        self._dirfd, self.socket, self._file = dirfd, sock, file
        return sock

    def refuse(self, answer: bytes) -> None:
        """From now until close(), answers every connection with `answer`, at
        once and unread: a stopping instance serves no request, and its clients
        hear so rather than wait, unaccepted, for the reset of close(). Once."""
        if self._refusing is None:
            wake, woken = socket.socketpair()
            thread = threading.Thread(target=self._refuse, args=(answer, woken), daemon=True)
            self._refusing = thread, wake
            thread.start()

    def _refuse(self, answer: bytes, woken: socket.socket) -> None:
        with woken:
            while woken not in select.select([self.socket, woken], [], [])[0]:
                self._answer(answer)
        # close() removed the socket's file: what the backlog holds is all that is left.
        self.socket.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._answer(answer)

    def _answer(self, answer: bytes) -> None:
        conn, _ = self.socket.accept()
        with conn, contextlib.suppress(OSError):     # a client gone: its loss
            conn.sendall(answer)

    def close(self) -> None:
        """Clients see nothing listening from here on, and the next `xlb up` may start."""
        try:
            os.unlink(SOCKET, dir_fd=self._dirfd)
        except FileNotFoundError:
            pass
        if self._refusing is not None:
            thread, wake = self._refusing
            wake.close()          # wakes its thread
            thread.join()
        self.socket.close()
        _let_go(self._dirfd)


def _locked_directory(held: int | None = None) -> int:
    """This namespace's directory, opened and locked (AlreadyRunning when
    another process holds it). `held`: the directory this process holds
    already, kept if it is still the one at the path."""
    while True:
        try:
            dirfd = _own_directory()
        except OSError as e:     # open_own's message names the directory
            raise ControlError(e.strerror if e.filename is None
                               else f"{e.filename}: {e.strerror}") from None
        if held is not None and _same(os.fstat(dirfd), os.fstat(held)):
            os.close(dirfd)
            return held
        try:
            fcntl.flock(dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dirfd)
            raise AlreadyRunning() from None
        if _at_path(dirfd):
            return dirfd
        # Removed between its open and its lock, by the instance that held
        # it as it stopped (_let_go): a socket bound there would be no one's
        # to find. The name is free again.
        os.close(dirfd)


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Holds this namespace's instance lock, as a running `xlb up` does, while
    what a dead instance left (its data path, its state, its socket file) is
    removed: an `xlb up` that starts meanwhile is refused, and one that
    started before is running (AlreadyRunning). REMOVING says so meanwhile:
    the lock alone, held with no socket, is also an instance whose socket
    was removed (holder()), which clients would wait for."""
    dirfd = _locked_directory()
    try:
        os.close(os.open(REMOVING, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600,
                         dir_fd=dirfd))
        yield
    finally:
        _remove_left(dirfd)
        _let_go(dirfd)


def _remove_left(dirfd: int) -> None:
    """Removes the socket file and the REMOVING mark from the directory
    dirfd: a crashed instance's, a killed `xlb down`'s, or this process's."""
    for name in (SOCKET, REMOVING):
        try:
            os.unlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            pass


def removing() -> bool:
    """Whether the instance lock is held by a process that removes what a
    dead instance left (exclusive), not by a running instance."""
    return (directory() / REMOVING).exists() and holder() is not None


def _claim(held: int | None = None) -> tuple[int, socket.socket, os.stat_result]:
    """This namespace's directory (opened and locked), a socket listening in it
    and its file's stat. `held`: the directory this process holds already,
    kept if it is still the one at the path."""
    dirfd = _locked_directory(held)
    if held is None:
        # A start, not a restore: no instance may run here already, one of
        # an earlier build, or one whose directory was removed or replaced.
        earlier = _earlier_instance()
        if earlier is not None:
            earlier.close()
        if earlier is not None or holder() is not None:
            _let_go(dirfd)
            raise AlreadyRunning()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _remove_left(dirfd)
        # Bound in the directory that is locked, whatever its path holds by now.
        sock.bind(f"/proc/self/fd/{dirfd}/{SOCKET}")
        sock.listen(16)
        st = os.stat(SOCKET, dir_fd=dirfd, follow_symlinks=False)
    except OSError as e:
        sock.close()
        if dirfd != held:
            _let_go(dirfd)
        raise ControlError(f"{address()}: {e.strerror}") from None
    return dirfd, sock, st


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _at_path(dirfd: int) -> bool:
    """The directory dirfd is the one at this namespace's path still."""
    try:
        return _same(os.stat(directory(), follow_symlinks=False), os.fstat(dirfd))
    except OSError:
        return False


def _let_go(dirfd: int) -> None:
    """Closes a directory this process locked, which releases the lock; removed
    first, while the lock keeps any other instance from using it, if it is
    still at its path and empty: each run would leave one more otherwise (an
    `ip netns exec` lab makes a namespace per run). Nothing a later instance
    needs is kept there: the data path is found through the kernel, and the
    saved state lives in xlb's state directory."""
    try:
        if _at_path(dirfd):
            os.rmdir(directory())
    except OSError:          # not empty: left as it is
        pass
    os.close(dirfd)


def _earlier_instance(timeout: float = 2.0) -> socket.socket | None:
    """A connection to an instance of an earlier build (EARLIER), or None: no
    one listens there, or not root, whom nothing is sent. The connect is
    bounded by 2 s: another user's listener that never accepts must not hold
    up every command."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(min(timeout, 2.0))
    try:
        sock.connect(EARLIER)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        sock.close()
        return None
    if struct.unpack("3i", creds)[1] != 0:
        sock.close()
        return None
    sock.settimeout(timeout)
    return sock


def holder() -> int | None:
    """The pid of another process of this network namespace that holds the
    lock of a directory by this namespace's name, or None: the running
    instance, also when its directory was removed or replaced since (the lock
    is the directory's own, not its name's). Only a directory of this user
    that no one else may enter counts, as _own_directory makes it: any user
    can make and lock one by the name elsewhere (/tmp), which passed for an
    instance and kept `xlb up` from starting. Only root can see another root
    process's: anyone else is told None."""
    name, netns = namespace_dirname(), os.stat("/proc/self/ns/net")
    try:
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    held: dict[int, set[tuple[int, int]]] = {}      # pid -> the files it locks
    for line in locks.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 00:1a:678 0 EOF"; a waiter's has "->"
        fields = line.split()
        if len(fields) < 6 or fields[1:4] != ["FLOCK", "ADVISORY", "WRITE"]:
            continue
        try:
            major, minor, ino = fields[5].split(":")
            held.setdefault(int(fields[4]), set()).add(
                (os.makedev(int(major, 16), int(minor, 16)), int(ino)))
        except ValueError:       # no line of a lock as this reads it
            continue
    held.pop(os.getpid(), None)
    # Each process's descriptors are looked at once, however many locks it
    # holds: looked at again for each lock, a user's thousands of locks made
    # each look take minutes (and `xlb up` start as late).
    for pid, locked in held.items():
        try:
            if not _same(os.stat(f"/proc/{pid}/ns/net"), netns):
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:          # gone meanwhile, or not ours to see
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                st = os.stat(path)
                if ((st.st_dev, st.st_ino) in locked and stat.S_ISDIR(st.st_mode)
                        and alone(st, PRIVATE) and os.readlink(path).removesuffix(" (deleted)")
                        .rsplit("/", 1)[-1] == name):
                    return pid
            except OSError:      # closed meanwhile
                continue
    return None


def _own_directory() -> int:
    """This namespace's directory under RUN_DIR, created if need be and opened.
    Refused (OSError) unless both are this user's alone: what another user could
    enter is no place for the socket, nor what they could write for the lock.
    RUN_DIR is checked before anything is made in it."""
    def made(path: Path) -> int:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        return open_own(path, PRIVATE)
    os.close(made(RUN_DIR))
    return made(directory())


def request(cmd: str, timeout: float = 10.0, **args) -> object:
    """Sends one request and returns its result; raises NotRunning (Ended) or
    ControlError (Stopping)."""
    try:
        return _request(cmd, timeout, args)
    except _Unanswered:
        # A stop cuts off what its last moments left unanswered, a kill all:
        # what runs now, if anything, says which.
        try:
            _request("ping", min(timeout, 2.0), {})
        except (NotRunning, Stopping) as e:
            raise (Ended() if isinstance(e, NotRunning) else e) from None
        except (ControlError, TimeoutError, _Unanswered):
            pass
        raise ControlError("the instance closed the connection without answering") from None
    except _Unfinished:
        raise ControlError(f"the instance began this change and has not finished it within "
                           f"{timeout:g} s: it may yet take effect (xlb status tells)") from None
    except TimeoutError:
        raise ControlError(f"the instance did not answer within {timeout:g} s (starting, "
                           f"or stopped)") from None


def _connect(timeout: float) -> socket.socket:
    """A socket connected to the instance. Where its socket is gone while the
    instance runs (its directory was removed), waits for it to make it again."""
    start = time.monotonic()
    waited = start + min(timeout, RESTORE_WAIT)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(address())
            return sock
        except BlockingIOError:
            # Its listen backlog is full: it accepts none while it starts.
            sock.close()
            if time.monotonic() > start + timeout:
                raise TimeoutError from None
            time.sleep(0.1)
            continue
        except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
            sock.close()      # nothing listens there (a /run/xlb that is a file, say)
        except PermissionError:
            sock.close()
            raise ControlError(ROOT_ONLY) from None
        if removing():
            raise NotRunning()
        pid = holder()
        if pid is None:
            earlier = _earlier_instance(timeout)
            if earlier is None:
                raise NotRunning()
            return earlier
        if time.monotonic() > waited:
            raise ControlError(f"xlb runs here (pid {pid}), but its control socket "
                               f"{address()} is gone and it has not made it again (its "
                               f"log says why); `kill -TERM {pid}` stops it")
        time.sleep(0.1)


def _request(cmd: str, timeout: float, args: dict) -> object:
    # The instance does nothing it reads after the deadline: a request that
    # waited for it (queued while it starts, or behind a long apply) after
    # this client gave up and said it failed must not take effect later.
    deadline = time.monotonic() + timeout
    with _connect(timeout) as sock:
        try:
            sock.sendall(json.dumps({"cmd": cmd, **args, "deadline": deadline,
                                     "progress": True}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The instance may answer before it has read all (an oversized request)
            # and close: its answer is still ours to read. (Left to click, EPIPE would exit 1 without a word.)
            pass
        buf, begun = bytearray(), False
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:     # stopping: it closed what it had not accepted
                chunk = b""
            except TimeoutError:
                if begun:
                    raise _Unfinished() from None
                raise
            if not chunk:
                raise _Unanswered()
            buf += chunk
            if buf.startswith(BEGUN):
                # Carried out from now on (an earlier build's instance never
                # says so): the timeout was for its turn, and a change that
                # takes effect must not be told as failed. It gets as long
                # again, the next recv's own timeout: a client (`xlb ha
                # follow`'s role) is not held for ever by an instance that hangs.
                del buf[:len(BEGUN)]
                begun = True
    reply = json.loads(buf)
    if reply.get("stopping"):
        raise Stopping(reply["error"], reply.get("pid"))
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"), reply.get("problems"),
                           reply.get("bad_input", False))
    return reply.get("result")


class _Unanswered(Exception):
    """The instance closed the connection without answering."""


class _Unfinished(Exception):
    """The instance began the change (BEGUN) and did not answer in time."""


def running(pid: int | None = None) -> bool:
    """False once nothing listens here, or (pid) once another instance than
    process pid answers: one that started as soon as it let go. An instance
    that is shutting down still counts, and so does one that does not answer
    (starting)."""
    try:
        reply = request("ping", timeout=2.0)
    except NotRunning:
        return False
    except (ControlError, OSError):
        return True
    return pid is None or not isinstance(reply, dict) or reply.get("pid") == pid
