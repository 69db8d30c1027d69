"""The control socket: how `xlb status` and `xlb down` reach the instance that
runs in this network namespace.

A Unix socket, `/run/xlb/netns-<inode of /proc/self/ns/net>/control.sock`:
one directory per network namespace, so instances in different namespaces
never see each other. /run is the same for every command in a namespace (`ip
netns exec` makes /sys its own, not /run), and only root may create or enter
/run/xlb (0700): no other user can connect, nor take the name first and keep
`xlb up` from starting. The one-instance lock is a flock of the namespace's
directory, which a crash releases; so a socket file a crash left behind is
replaced by the next `xlb up`, and until then refuses connections.

Protocol: one JSON object per line each way, one request per connection.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .state import PRIVATE, namespace_dirname, open_own

RUN_DIR = Path("/run/xlb")
SOCKET = "control.sock"
MAX_REQUEST = 8 << 20    # a config of 10,000 servers is well under 1 MiB
ROOT_ONLY = "permission denied: the control socket is root-only"


class NotRunning(Exception):
    def __init__(self):
        super().__init__("no xlb instance runs in this network namespace")


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


def directory() -> Path:
    return RUN_DIR / namespace_dirname()


def address() -> str:
    return str(directory() / SOCKET)


class Listener:
    """This namespace's control socket, bound and listening, and the lock that
    makes its instance the only one; close() gives both up."""

    def __init__(self):
        try:
            self._dirfd = _own_directory()
        except OSError as e:     # open_own's message names the directory
            raise ControlError(e.strerror if e.filename is None
                               else f"{e.filename}: {e.strerror}") from None
        try:
            fcntl.flock(self._dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dirfd)
            raise AlreadyRunning() from None
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                os.unlink(SOCKET, dir_fd=self._dirfd)   # a crashed instance's
            except FileNotFoundError:
                pass
            self.socket.bind(address())
            self.socket.listen(16)
        except OSError as e:
            self.socket.close()
            os.close(self._dirfd)
            raise ControlError(f"{address()}: {e.strerror}") from None

    def close(self) -> None:
        """Clients see nothing listening from here on, and the next `xlb up` may start."""
        try:
            os.unlink(SOCKET, dir_fd=self._dirfd)
        except FileNotFoundError:
            pass
        self.socket.close()
        os.close(self._dirfd)


def _own_directory() -> int:
    """This namespace's directory under RUN_DIR, created if need be and opened.
    Refused (OSError) unless both are this user's alone: what another user could
    enter is no place for the socket, nor what they could write for the lock."""
    for path in (RUN_DIR, directory()):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    os.close(open_own(RUN_DIR, PRIVATE))
    return open_own(directory(), PRIVATE)


def request(cmd: str, timeout: float = 10.0, **args) -> object:
    """Sends one request and returns its result; raises NotRunning or ControlError."""
    try:
        return _request(cmd, timeout, args)
    except TimeoutError:
        raise ControlError(f"the instance did not answer within {timeout:g} s (starting, "
                           f"or stopped)") from None


def _request(cmd: str, timeout: float, args: dict) -> object:
    # The instance does nothing it reads after the deadline: a request that
    # waited for it (queued while it starts, or behind a long apply) after
    # this client gave up and said it failed must not take effect later.
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address())
        except (ConnectionRefusedError, FileNotFoundError):
            raise NotRunning() from None
        except PermissionError:
            raise ControlError(ROOT_ONLY) from None
        try:
            sock.sendall(json.dumps({"cmd": cmd, **args, "deadline": deadline}).encode()
                         + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The instance may answer before it has read all (an oversized request)
            # and close: its answer is still ours to read. (Left to click, EPIPE would exit 1 without a word.)
            pass
        buf = bytearray()
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:     # stopping: it closed what it had not accepted
                chunk = b""
            if not chunk:
                raise ControlError("the instance closed the connection without answering")
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"), reply.get("problems"),
                           reply.get("bad_input", False))
    return reply.get("result")


def running() -> bool:
    """False once nothing listens here; an instance that is shutting down still counts."""
    try:
        request("ping", timeout=2.0)
    except NotRunning:
        return False
    except (ControlError, OSError):
        pass
    return True
