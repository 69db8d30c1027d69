#!/usr/bin/python3
"""The client of the failover tests and demo (standard library only).

    ha_client.py load HOST PORT --seconds S [--every 0.02] [--hold N]
                 [--hold-every 0.1] [--timeout 3]          prints one JSON object:

For S seconds it opens a new connection every --every seconds (one GET each,
"Connection: close", in its own thread, so a stalled one does not hold back the
next), and keeps --hold long-lived keep-alive connections sending a GET every
--hold-every seconds; a long-lived connection that fails once is not reopened.
A request that fails ends its connection with a reset (clients.abort).

    {"new": [[start, seconds, name, error, acked], ...]
                                                   one per new connection: its
                                                   start (Unix time), how long it
                                                   took, the server's name or null,
                                                   the error or null, and whether
                                                   the server had acknowledged
                                                   the whole request (TCP_INFO)
     "held": [{"requests": n, "names": [...], "error": null or "...",
               "error_at": null or t, "port": its local port}, ...]}

    ha_client.py summary FILE --since T
        what `load` wrote to FILE, in one line, with the outage after time T
        (a crash): from T to the start of the first new connection after which
        every one went through at once.
"""

import argparse
import http.client
import json
import socket
import struct
import threading
import time

from clients import abort

TCP_ESTABLISHED = 1
TCPI_UNACKED = 24   # offset of tcpi_unacked in struct tcp_info (linux/tcp.h)


def request_acked(sock) -> bool:
    """Whether the server acknowledged all that was sent on sock, an
    established connection."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_UNACKED + 4)
    except OSError:
        return False
    return info[0] == TCP_ESTABLISHED and struct.unpack_from("I", info, TCPI_UNACKED)[0] == 0


def one_request(host, port, timeout, out, lock):
    start = time.time()
    name = error = None
    acked = True
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        name = resp.read().decode().strip()
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
        acked = conn.sock is not None and request_acked(conn.sock)
        abort(conn)
    conn.close()
    with lock:
        out.append([start, time.time() - start, name, error, acked])


def held(host, port, deadline, every, timeout, rec):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    names = []
    while time.time() < deadline:
        try:
            conn.request("GET", "/")
            rec["port"] = conn.sock.getsockname()[1]
            names.append(conn.getresponse().read().decode().strip())
        except OSError as e:
            rec["error"], rec["error_at"] = f"{type(e).__name__}: {e}", time.time()
            abort(conn)
            break
        rec["requests"] += 1
        time.sleep(every)
    conn.close()
    rec["names"] = sorted(set(names))


STALLED = 0.5       # seconds: a new connection that took longer lost its first SYN
IN_FLIGHT = 0.1     # seconds: a new connection takes a few ms here


def summary(result, since):
    """Counts of what `load` saw, and the outage in seconds after time `since`.
    "unanswered": the failed connections opened in the IN_FLIGHT seconds before
    `since` whose server had acknowledged the request: its answer was on its
    way at `since`."""
    new, held = result["new"], result["held"]
    failed = [c for c in new if c[3]]
    unanswered = [c for c in failed if since - IN_FLIGHT <= c[0] < since and c[4]]
    stalled = [c for c in new if not c[3] and c[1] >= STALLED]
    slow = [c[0] for c in failed + stalled if c[0] >= since - STALLED]
    after = [c[0] for c in new if slow and c[0] > max(slow)]
    lost = [h for h in held if h["error"] is not None or len(h["names"]) != 1]
    # What went wrong, each with its time after `since`, so a failed run says why.
    trouble = [f"new at {c[0] - since:+.3f} s: {c[3]}"
               + (", the request acknowledged" if c[4] else "") for c in failed] + [
        f"long-lived from port {h['port']} on {h['names']}: "
        + (f"{h['error']} at {h['error_at'] - since:+.3f} s" if h["error"] else "changed server")
        for h in lost]
    return {"new": len(new), "failed": len(failed), "unanswered": len(unanswered),
            "stalled": len(stalled),
            "outage": after[0] - since if after else 0.0, "held": len(held),
            "held_survived": len(held) - len(lost), "trouble": trouble}


def describe(s):
    return (f"{s['new']} new connections: {s['failed']} failed ({s['unanswered']} with an "
            f"answer in flight), {s['stalled']} stalled "
            f"(a SYN lost, resent after 1 s); outage {s['outage']:.3f} s; long-lived "
            f"connections: {s['held_survived']} of {s['held']} survived on their server"
            + "".join(f"\n  {t}" for t in s["trouble"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sm = sub.add_parser("summary")
    sm.add_argument("file")
    sm.add_argument("--since", type=float, required=True)
    ld = sub.add_parser("load")
    ld.add_argument("host")
    ld.add_argument("port", type=int)
    ld.add_argument("--seconds", type=float, required=True)
    ld.add_argument("--every", type=float, default=0.02)
    ld.add_argument("--hold", type=int, default=0)
    ld.add_argument("--hold-every", type=float, default=0.1)
    ld.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args()
    if a.cmd == "summary":
        with open(a.file) as f:
            print(describe(summary(json.load(f), a.since)))
        return
    deadline = time.time() + a.seconds
    lock = threading.Lock()
    new, holds, threads = [], [], []
    for _ in range(a.hold):
        rec = {"requests": 0, "names": [], "error": None, "error_at": None, "port": None}
        holds.append(rec)
        threads.append(threading.Thread(target=held, args=(a.host, a.port, deadline,
                                                            a.hold_every, a.timeout, rec)))
        threads[-1].start()
    tick = time.time()
    while tick < deadline:
        t = threading.Thread(target=one_request, args=(a.host, a.port, a.timeout, new, lock))
        t.start()
        threads.append(t)
        tick += a.every
        time.sleep(max(0.0, tick - time.time()))
    for t in threads:
        t.join()
    print(json.dumps({"new": sorted(new), "held": holds}))


if __name__ == "__main__":
    main()
