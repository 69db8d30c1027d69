#!/usr/bin/python3
"""Test clients for the lab (standard library only); each prints one JSON object.

    clients.py http HOST PORT [--count N] [--keepalive] [--timeout S]
        N GET requests: each on a new connection ("Connection: close"), or all on
        one keep-alive connection. {"names": [...], "errors": [...]}
    clients.py udp HOST PORT [--count N] [--timeout S]
        N datagrams, each from a new socket (a new flow).
        {"replies": [[name, source_ip, source_port], ...], "errors": [...]}
"""

import argparse
import http.client
import json
import socket


def http_requests(host, port, count, keepalive, timeout):
    names, errors = [], []
    conn = None
    for _ in range(count):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.request("GET", "/", headers={} if keepalive else {"Connection": "close"})
            resp = conn.getresponse()
            names.append(resp.read().decode().strip())
            if not keepalive:
                conn.close()
                conn = None
        except OSError as e:
            errors.append(str(e))
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return {"names": names, "errors": errors}


def udp_requests(host, port, count, timeout):
    replies, errors = [], []
    for i in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            try:
                s.sendto(f"probe {i}".encode(), (host, port))
                data, (src, sport) = s.recvfrom(2048)
                replies.append([data.decode().strip(), src, sport])
            except OSError as e:
                errors.append(str(e) or "timed out")
    return {"replies": replies, "errors": errors}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("http", "udp"):
        p = sub.add_parser(cmd)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--count", type=int, default=1)
        p.add_argument("--timeout", type=float, default=3.0)
        if cmd == "http":
            p.add_argument("--keepalive", action="store_true")
    a = ap.parse_args()
    if a.cmd == "http":
        out = http_requests(a.host, a.port, a.count, a.keepalive, a.timeout)
    else:
        out = udp_requests(a.host, a.port, a.count, a.timeout)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
