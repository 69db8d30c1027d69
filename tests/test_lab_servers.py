"""The lab's web server (netns-lab/servers.py), over a socket pair: no network."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from servers import make_web_handler


class RecordingSocket(socket.socket):
    """A socket that keeps what each send call was given."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.writes: list[bytes] = []

    def send(self, data, *flags):
        self.writes.append(bytes(data))
        return super().send(data, *flags)

    def sendall(self, data, *flags):
        self.writes.append(bytes(data))
        return super().sendall(data, *flags)


def test_a_response_leaves_in_one_write():
    """Header and body in one write, as nginx sends a small response: written
    apart, the body waits for the header's ACK, and the failover tests lose a
    connection when a node dies between the two (servers.py says how)."""
    ours, theirs = socket.socketpair()
    conn = RecordingSocket(fileno=ours.detach())
    theirs.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\nGET / HTTP/1.1\r\nHost: lab\r\n"
                   b"Connection: close\r\n\r\n")
    with conn, theirs:
        make_web_handler(b"WAS1\n")(conn, ("10.1.1.10", 40000), None)
        answer = theirs.recv(65536)
    assert len(conn.writes) == 2                            # one per request, keep-alive
    for write in conn.writes:
        assert write.startswith(b"HTTP/1.1 200 ") and write.endswith(b"\r\n\r\nWAS1\n")
    assert answer.count(b"WAS1\n") == 2


def test_get_delay_answers_after_that_many_seconds():
    """GET /delay/S: a response in flight for S seconds, for the failover tests."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"GET /delay/0.3 HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
    start = time.monotonic()
    with ours, theirs:
        make_web_handler(b"WAS1\n")(ours, ("10.1.1.10", 40000), None)
        answer = theirs.recv(65536)
    assert time.monotonic() - start >= 0.3          # sleep() waits at least that long
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"WAS1\n")


def test_get_hold_answers_once_its_file_exists_beside_the_pidfile(tmp_path):
    """GET /hold/NAME: a response in flight until the test creates NAME in the
    server's run directory, for the tests whose action must land first; NAME.held
    made there as it comes, for them to know when it reached the server."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"GET /hold/release_1 HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
    theirs.settimeout(0.5)
    server = threading.Thread(target=make_web_handler(b"WAS1\n", run_dir=str(tmp_path)),
                              args=(ours, ("10.1.1.10", 40000), None))
    server.start()
    with ours, theirs:
        with pytest.raises(socket.timeout):
            theirs.recv(65536)                      # held: no answer yet
        assert (tmp_path / "release_1.held").exists()
        (tmp_path / "release_1").touch()
        theirs.settimeout(10)
        answer = theirs.recv(65536)
        server.join()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"WAS1\n")


def test_get_pad_answers_that_many_bytes():
    """GET /pad/N: the name padded with dots to N bytes, a large answer (for
    path MTU discovery of the servers' replies)."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"GET /pad/100000 HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")

    def serve():        # in a thread: the answer is larger than the pair's buffers
        with ours:
            make_web_handler(b"WAS1\n")(ours, ("10.1.1.10", 40000), None)
    server = threading.Thread(target=serve)
    server.start()
    with theirs:
        answer = b""
        while chunk := theirs.recv(65536):
            answer += chunk
    server.join()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100000" in head
    assert body == b"WAS1\n" + b"." * (100000 - 5)
