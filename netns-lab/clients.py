#!/usr/bin/python3
"""Test clients for the lab (standard library only); each prints one JSON object.

    clients.py http HOST PORT [--count N] [--keepalive] [--timeout S]
        N GET requests: each on a new connection ("Connection: close"), or all on
        one keep-alive connection. {"names": [...], "errors": [...]}
    clients.py udp HOST PORT [--count N] [--size BYTES] [--timeout S]
        N datagrams (of BYTES, padded; over the MTU they go in fragments, and so
        does the answer), each from a new socket (a new flow).
        {"replies": [[name, source_ip, source_port, bytes], ...], "errors": [...]}
    http and udp run on one CPU (the lowest allowed): a veth hands a packet to the
    next namespace's XDP program on the CPU that sent it, and round-robin keeps one
    cursor per CPU, so their new flows follow one cursor and split exactly evenly,
    however many CPUs the host has.
    clients.py load HOST PORT --seconds S [--concurrency C] [--keepalive] [--interval I]
        C threads send GETs for S seconds, each on a new connection or on one
        keep-alive connection per thread; with I, each thread starts one every I
        seconds (as long as each takes less). {"ok": n, "names": {...}, "errors": [...],
        "error_count": n, "error_times": [unix time of each failure]}
    clients.py hold HOST PORT --count N (--pause S | --step)
        N GETs on ONE keep-alive connection, S seconds apart, or with --step each
        after the first once a line (or the end) comes on stdin: a test that acts
        between two requests says when, however slow the machine; prints a JSON
        line per request as it completes: {"i": i, "name": ..., "t": unix time} or
        {"i": i, "error": ..., "t": unix time}
    A request that fails ends its connection with a reset (abort), not a close.
    clients.py hop HOST PORT [--ttl T] [--timeout S]
        One TCP connect with IP TTL T, as `traceroute -T` probes: the ICMP error the
        kernel matched to it, {"error": ..., "icmp": [type, code], "from": address},
        or {"connected": true}, or {"error": ...} alone (no error came back).
"""

import argparse
import collections
import http.client
import json
import os
import socket
import struct
import sys
import threading
import time


def abort(conn):
    """Ends conn with a reset. A close would leave its unanswered request to
    be sent again for minutes (FIN-WAIT-1), into the tests that run next:
    where another instance sends it to a server still holding the connection
    (one that a disable took it from), the connection comes back to life."""
    if conn.sock is not None:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def get(conn, host, port, timeout, keepalive):
    """GET / on conn, or on a new connection if it is None: the status, the
    body and the connection to reuse (None unless keepalive). An OSError
    aborts the connection and goes to the caller."""
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("GET", "/", headers={} if keepalive else {"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode().strip()
        if not keepalive:
            conn.close()
            conn = None
    except OSError:
        if conn is not None:
            abort(conn)
        raise
    return resp.status, body, conn


def http_requests(host, port, count, keepalive, timeout):
    names, errors = [], []
    conn = None
    for _ in range(count):
        try:
            _, body, conn = get(conn, host, port, timeout, keepalive)
            names.append(body)
        except OSError as e:
            errors.append(str(e))
            conn = None
    if conn is not None:
        conn.close()
    return {"names": names, "errors": errors}


def udp_requests(host, port, count, timeout, size):
    replies, errors = [], []
    for i in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            try:
                s.sendto(f"probe {i}\n".encode().ljust(size, b"x"), (host, port))
                data, (src, sport) = s.recvfrom(65535)
                replies.append([data.split(b"\n")[0].decode(), src, sport, len(data)])
            except OSError as e:
                errors.append(str(e) or "timed out")
    return {"replies": replies, "errors": errors}


def load(host, port, seconds, concurrency, keepalive, timeout, interval=0.0):
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    names, errors = collections.Counter(), []

    def worker():
        conn = None
        due = time.monotonic()
        while time.monotonic() < deadline:
            if interval:
                time.sleep(max(0.0, due - time.monotonic()))
                due += interval
            try:
                status, body, conn = get(conn, host, port, timeout, keepalive)
                with lock:
                    names[body if status == 200 else f"status {status}"] += 1
            except OSError as e:
                with lock:
                    errors.append((time.time(), f"{type(e).__name__}: {e}"))
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = sum(n for name, n in names.items() if not name.startswith("status "))
    return {"ok": ok, "names": dict(names), "errors": [e for _, e in errors[:20]],
            "error_count": len(errors), "error_times": sorted(t for t, _ in errors)}


def hold(host, port, count, pause, timeout, step):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    for i in range(count):
        if step and i:
            sys.stdin.readline()
        elif i:
            time.sleep(pause)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            print(json.dumps({"i": i, "name": resp.read().decode().strip(),
                              "t": round(time.time(), 3)}), flush=True)
        except OSError as e:
            print(json.dumps({"i": i, "error": f"{type(e).__name__}: {e}",
                              "t": round(time.time(), 3)}), flush=True)
            abort(conn)
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.close()


IP_RECVERR = 11      # <linux/in.h>; not in every Python's socket module


def hop(host, port, ttl, timeout):
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        return {"connected": True}
    except OSError as e:
        out = {"error": f"{type(e).__name__}: {e}"}
        try:
            _, ancillary, _, _ = s.recvmsg(0, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:
            return out      # nothing queued: no ICMP error matched the connection
        for level, kind, data in ancillary:
            if (level, kind) == (socket.IPPROTO_IP, IP_RECVERR):
                # struct sock_extended_err, then the sender of the ICMP (sockaddr_in)
                out["icmp"] = [data[5], data[6]]
                out["from"] = socket.inet_ntoa(data[20:24])
        return out
    finally:
        s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("http", "udp", "load", "hold", "hop"):
        p = sub.add_parser(cmd)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--count", type=int, default=1)
        p.add_argument("--timeout", type=float, default=3.0)
        p.add_argument("--keepalive", action="store_true")
        p.add_argument("--seconds", type=float, default=5.0)
        p.add_argument("--concurrency", type=int, default=8)
        p.add_argument("--pause", type=float, default=0.5)
        p.add_argument("--step", action="store_true")
        p.add_argument("--interval", type=float, default=0.0)
        p.add_argument("--ttl", type=int, default=1)
        p.add_argument("--size", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "hold":
        hold(a.host, a.port, a.count, a.pause, a.timeout, a.step)
        return
    if a.cmd == "hop":
        print(json.dumps(hop(a.host, a.port, a.ttl, a.timeout)))
        return
    if a.cmd in ("http", "udp"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if a.cmd == "http":
        out = http_requests(a.host, a.port, a.count, a.keepalive, a.timeout)
    elif a.cmd == "udp":
        out = udp_requests(a.host, a.port, a.count, a.timeout, a.size)
    else:
        out = load(a.host, a.port, a.seconds, a.concurrency, a.keepalive, a.timeout,
                   a.interval)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
