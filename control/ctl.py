"""The control socket: how `xlb status` and `xlb down` reach the instance that
runs in this network namespace.

It is an abstract Unix socket. Its name belongs to the network namespace, so
each namespace has its own and instances in different namespaces never see
each other; and it is no file, so neither the private /sys and mounts of
`ip netns exec` nor a crash can hide it or leave it stale. Only root may use
it: the server checks each peer's credentials. Being no file, it has no
permissions either: any local user may bind the name first, so a client talks
only to a server that runs as root (xlb up does) or as its own user, and
`xlb up` names a holder that does not.

Protocol: one JSON object per line each way, one request per connection.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time

ADDRESS = "\0xlb/control"
MAX_REQUEST = 8 << 20    # a config of 10,000 servers is well under 1 MiB


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


class Squatted(ControlError):
    """Another user's process holds the control address."""

    def __init__(self, pid: int, uid: int):
        super().__init__(f"the control address (abstract socket @xlb/control) is held by "
                         f"pid {pid}, of uid {uid}: not xlb, which runs as root")


def bind() -> socket.socket:
    """Claims this namespace's control address: the claim is the "one instance" lock."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(ADDRESS)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            _check_holder()
            raise AlreadyRunning() from None
        raise
    sock.listen(16)
    return sock


def peer_uid(sock: socket.socket) -> int:
    return _peer(sock)[1]


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the other end: for a client, of the server as it listened."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def _trusted(uid: int) -> bool:
    """A listener of root (xlb up), or of this user, who can learn nothing new from it."""
    return uid in (0, os.geteuid())


def _check_holder() -> None:
    """Raises Squatted when what listens at the address does not run as root."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(ADDRESS)
        except OSError:        # bound but not listening, or gone: nothing to name
            return
        pid, uid = _peer(sock)
    if not _trusted(uid):
        raise Squatted(pid, uid)


def request(cmd: str, timeout: float = 10.0, **args) -> object:
    """Sends one request and returns its result; raises NotRunning or ControlError
    (Squatted too)."""
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
            sock.connect(ADDRESS)
        except (ConnectionRefusedError, FileNotFoundError):
            raise NotRunning() from None
        pid, uid = _peer(sock)
        if not _trusted(uid):   # another user's: it must not read a config, nor answer
            raise Squatted(pid, uid)
        try:
            sock.sendall(json.dumps({"cmd": cmd, **args, "deadline": deadline}).encode()
                         + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The instance may answer before it reads (a refusal) and close: its answer
            # is still ours to read. (Left to click, EPIPE would exit 1 without a word.)
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
