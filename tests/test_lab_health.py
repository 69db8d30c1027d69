"""Health checks end to end: real servers die, hang, answer 500 or lose their
check listener, and the balancer takes them out after `fall` failed checks,
then brings them back after `rise` checks."""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from datetime import datetime

import pytest

from labctl import HERE, PY, VIP, running_lab, wait_for

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.25, 2, 2


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbh") as lab:
        yield lab


def seed(monitor: str, port: int | None = None, servers=(("was1", "10.1.11.101", 8080),
                                                         ("was2", "10.1.11.102", 8080))) -> str:
    out = [f'[monitors.m]\ntype = "{monitor}"\ninterval = {INTERVAL}\ntimeout = {TIMEOUT}\n'
           f'rise = {RISE}\nfall = {FALL}\n' + (f"port = {port}\n" if port else "")]
    for name, addr, p in servers:
        out.append(f'[servers.{name}]\naddress = "{addr}"\nport = {p}\n')
    names = json.dumps([n for n, _, _ in servers])
    out.append(f'[pools.web]\nservers = {names}\nmonitor = "m"\n')
    out.append(f'[frontends.www]\nvip = "{VIP}"\nport = 80\npool = "web"\n')
    return "\n".join(out)


def server_status(lab, server: str) -> dict:
    return next(s for s in lab.status()["pools"][0]["servers"] if s["name"] == server)


def health(lab, server: str) -> str:
    return server_status(lab, server)["health"]


def wait_health(lab, server: str, want: str) -> float:
    """Polls until `server` has health `want`; returns when it was seen (Unix
    time, as the clients' and the log's times). How soon is not asserted: the
    deadline, generous for a busy machine, keeps a broken check from hanging
    the test, which then fails naming what it waited for."""
    wait_for(lambda: health(lab, server) == want, 60, f"{server}'s health {want}")
    return time.time()


def transitions(stderr: str, server: str) -> list[tuple[float, str, str]]:
    """(unix time, new state, reason) of each logged health change of server."""
    out = []
    for line in stderr.splitlines():
        if "event=health" in line and f"server={server} " in line:
            ts = re.search(r"ts=(\S+)Z", line).group(1)
            t = datetime.fromisoformat(ts + "+00:00").timestamp()
            new = re.search(r" new=(\w+)", line).group(1)
            reason = re.search(r'reason=("[^"]*"|\S+)', line).group(1).strip('"')
            out.append((t, new, reason))
    return out


def start_xlb(lab, tmp_path, text: str):
    path = tmp_path / "xlb.toml"
    path.write_text(text)
    return lab.xlb("--config", str(path))


def test_dead_server_leaves_and_returns(lab, tmp_path):
    """A server that stops is taken out after it stopped, and from then on no
    request fails; started again, it comes back. Only the order of events is
    asserted: how long detection took is printed."""
    with start_xlb(lab, tmp_path, seed("http")) as x:
        wait_health(lab, "was2", "up")
        before = lab.client("client", "http", VIP, "80", "--count", "10")
        # New connections around the server's death (from 1 s before the stop).
        during = lab.spawn("client", PY, str(HERE / "clients.py"), "load", VIP, "80",
                           "--seconds", "5", "--concurrency", "4", "--timeout", "2")
        time.sleep(1)
        t_stop = time.time()
        lab.server("stop", "was2")
        # The boundary: xlb reports it down (status answers only once the data
        # path has the change). Every request after it must be answered.
        t_seen = wait_health(lab, "was2", "down")
        after_down = lab.client("client", "load", VIP, "80", "--seconds", "2",
                                "--concurrency", "4", "--timeout", "2")
        still_down = health(lab, "was2")
        t_start = time.time()
        lab.server("start", "was2")
        wait_health(lab, "was2", "up")
        back = lab.client("client", "http", VIP, "80", "--count", "10")
        result = json.loads(during.communicate(timeout=60)[0])
    changes = transitions(x.stderr, "was2")
    assert [c[1] for c in changes] == ["down", "up"], changes
    (t_down, _, down_reason), (t_up, _, up_reason) = changes
    print(f"\ndown {t_down - t_stop:.3f}s after the stop, reported by status "
          f"{t_seen - t_stop:.3f}s after ({down_reason}); up {t_up - t_start:.3f}s after "
          f"the restart; the load around the stop: {result['ok']} answered, "
          f"{result['error_count']} failed")
    assert before["errors"] == [] and set(before["names"]) == {"WAS1", "WAS2"}
    # Down only after the server stopped, and stayed down while it was stopped.
    assert t_stop < t_down <= t_seen, (t_stop, t_down, t_seen)
    assert "refused" in down_reason and still_down == "down"
    # The load around the stop: failures only once the server had stopped.
    assert all(t >= t_stop for t in result["error_times"]), (t_stop, result["error_times"])
    assert result["ok"] > 0 and set(result["names"]) <= {"WAS1", "WAS2"}, result
    # Once reported down: not one failure, and only the other server answers.
    assert after_down["error_count"] == 0, after_down["errors"]
    assert after_down["ok"] > 0 and set(after_down["names"]) == {"WAS1"}, after_down
    # Back only after it was started again, after `rise` checks, and serving.
    assert t_start < t_up and up_reason == "check passed"
    assert back["errors"] == [] and set(back["names"]) == {"WAS1", "WAS2"}


def test_http_500_with_port_open_is_down(lab, tmp_path):
    proc = lab.web_server("was2", "WAS2", 8090, "--status", "500")
    try:
        text = seed("http", servers=(("was1", "10.1.11.101", 8080), ("was2", "10.1.11.102", 8090)))
        with start_xlb(lab, tmp_path, text) as x:
            wait_health(lab, "was2", "down")
            assert lab.client("client", "http", VIP, "80", "--count", "6")["names"] == ["WAS1"] * 6
            st = lab.status()["pools"][0]["servers"][1]
            assert "500" in st["last_check"]["reason"]
        assert "500" in transitions(x.stderr, "was2")[0][2]
    finally:
        proc.terminate()
        proc.wait(5)


def test_server_that_never_answers_is_down_by_timeout(lab, tmp_path):
    proc = lab.web_server("was2", "stuck", 8091, kind="hang")
    try:
        text = seed("http", servers=(("was1", "10.1.11.101", 8080), ("was2", "10.1.11.102", 8091)))
        with start_xlb(lab, tmp_path, text) as x:
            wait_health(lab, "was2", "down")
        (t, new, reason), = transitions(x.stderr, "was2")
        assert new == "down" and "timeout" in reason
    finally:
        proc.terminate()
        proc.wait(5)


def test_separate_check_port(lab, tmp_path):
    """The seed registers a health-check port of its own: losing only that
    listener takes the server out, although its service port still answers."""
    checks = [lab.web_server(node, f"{node}-check", 9000) for node in ("was1", "was2")]
    try:
        with start_xlb(lab, tmp_path, seed("tcp", port=9000)):
            wait_health(lab, "was2", "up")
            checks[1].terminate()
            checks[1].wait(5)
            wait_health(lab, "was2", "down")
            assert lab.client("client", "http", VIP, "80", "--count", "6")["names"] == ["WAS1"] * 6
            # the service port itself still answers
            direct = lab.client("client", "http", "10.1.11.102", "8080")
            assert direct["names"] == ["WAS2"]
    finally:
        for proc in checks:
            proc.terminate()
            proc.wait(5)


def test_https_check_listener_lost_and_back(lab, tmp_path, tls_pem):
    """An https monitor of each server's HTTPS check listener (port 9443, a
    self-signed certificate, which the check does not verify): both pass;
    was2's listener gone, was2 goes down while its service port still
    answers; the listener back, was2 comes back."""
    def listener(node):
        return lab.web_server(node, f"{node}-check", 9443, "--tls", str(tls_pem))

    checks = {node: listener(node) for node in ("was1", "was2")}
    try:
        with start_xlb(lab, tmp_path, seed("https", port=9443)) as x:
            wait_for(lambda: all(server_status(lab, s)["last_check"] for s in ("was1", "was2")),
                     10, "the first checks")
            assert [(s["health"], s["last_check"]["reason"])
                    for s in lab.status()["pools"][0]["servers"]] == [("up", "check passed")] * 2
            checks["was2"].terminate()
            checks["was2"].wait(5)
            wait_health(lab, "was2", "down")
            assert lab.client("client", "http", VIP, "80", "--count", "6")["names"] == ["WAS1"] * 6
            assert lab.client("client", "http", "10.1.11.102", "8080")["names"] == ["WAS2"]
            checks["was2"] = listener("was2")
            wait_health(lab, "was2", "up")
            back = lab.client("client", "http", VIP, "80", "--count", "6")
            shown = tomllib.loads(lab.xlb_cmd("show", check=True).stdout)["monitors"]["m"]
    finally:
        for proc in checks.values():
            proc.terminate()
            proc.wait(5)
    assert back["errors"] == [] and set(back["names"]) == {"WAS1", "WAS2"}
    assert [(new, reason) for _, new, reason in transitions(x.stderr, "was2")] == [
        ("down", "connect: connection refused"), ("up", "check passed")]
    assert (shown["type"], shown["port"], shown["path"]) == ("https", 9443, "/")


def test_all_down_drops_and_counts_then_resumes(lab, tmp_path):
    with start_xlb(lab, tmp_path, seed("tcp")):
        lab.server("stop", "was1")
        lab.server("stop", "was2")
        try:
            wait_health(lab, "was1", "down")
            wait_health(lab, "was2", "down")
            out = lab.client("client", "http", VIP, "80", "--count", "3", "--timeout", "1")
            assert len(out["errors"]) == 3
            st = lab.status()
            assert st["frontends"][0]["servers_taking_flows"] == 0
            assert st["reasons"]["drop_no_backend"]["packets"] >= 3
            assert "no server of pool web is up" in lab.xlb_cmd("status").stdout
        finally:
            lab.server("start", "was1")
            lab.server("start", "was2")
        wait_health(lab, "was1", "up")
        out = lab.client("client", "http", VIP, "80", "--count", "4")
        assert out["errors"] == [] and "WAS1" in out["names"]


def test_udp_check_takes_out_a_server_whose_udp_listener_is_gone(lab, tmp_path):
    """A UDP frontend's servers checked with a udp monitor: a request, and a
    reply that begins "WAS" (the lab's servers answer with their name). One
    whose UDP listener is gone, its TCP one still there, is taken out by the
    ICMP port unreachable its check gets, and its share of new flows goes to
    the other; its UDP listener back, it comes back."""
    port = 9053
    text = (f'[monitors.m]\ntype = "udp"\nsend_hex = "{b"ping".hex()}"\n'
            f'expect_hex = "{b"WAS".hex()}"\ninterval = {INTERVAL}\ntimeout = {TIMEOUT}\n'
            f'rise = {RISE}\nfall = {FALL}\n'
            + "".join(f'[servers.{name}]\naddress = "{addr}"\nport = {port}\n'
                      for name, addr in (("was1", "10.1.11.101"), ("was2", "10.1.11.102")))
            + '[pools.dns]\nservers = ["was1", "was2"]\nmonitor = "m"\n'
            + f'[frontends.dns]\nvip = "{VIP}"\nport = 53\nprotocol = "udp"\npool = "dns"\n')
    names = lambda out: sorted({name for name, *_ in out["replies"]})    # noqa: E731
    procs = [lab.web_server(node, node.upper(), port) for node in ("was1", "was2")]
    try:
        with start_xlb(lab, tmp_path, text) as x:
            wait_for(lambda: all(server_status(lab, s)["last_check"] for s in ("was1", "was2")),
                     10, "the first checks")
            assert [health(lab, s) for s in ("was1", "was2")] == ["up", "up"]
            before = lab.client("client", "udp", VIP, "53", "--count", "10")
            procs[1].terminate()
            procs[1].wait(5)
            procs[1] = lab.web_server("was2", "WAS2", port, kind="db")     # TCP alone
            wait_health(lab, "was2", "down")
            after = lab.client("client", "udp", VIP, "53", "--count", "10", "--timeout", "1")
            procs[1].terminate()
            procs[1].wait(5)
            procs[1] = lab.web_server("was2", "WAS2", port)
            wait_health(lab, "was2", "up")
            back = lab.client("client", "udp", VIP, "53", "--count", "10")
            shown = tomllib.loads(lab.xlb_cmd("show", check=True).stdout)["monitors"]["m"]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(5)
    assert before["errors"] == [] and names(before) == ["WAS1", "WAS2"]
    assert after["errors"] == [] and names(after) == ["WAS1"]
    assert back["errors"] == [] and names(back) == ["WAS1", "WAS2"]
    assert [(new, reason) for _, new, reason in transitions(x.stderr, "was2")] == [
        ("down", "recv: connection refused (port unreachable)"), ("up", "check passed")]
    assert (shown["send_hex"], shown["expect_hex"]) == ("70696e67", "574153")


def test_one_line_form_checks_by_default(lab):
    with lab.xlb("--vip", f"{VIP}:80", "--backend", "10.1.11.101:8080",
                 "--backend", "10.1.11.102:9999", "--interval", "0.5"):
        wait_health(lab, "backend2", "down")
        st = lab.status()["pools"][0]["servers"]
        assert [s["health"] for s in st] == ["up", "down"]
        assert lab.client("client", "http", VIP, "80", "--count", "4")["names"] == ["WAS1"] * 4


def test_one_line_check_options(lab, tmp_path):
    """--check http:/PATH, --check-port, --interval, --rise and --fall reach the
    checker: each WAS host gets a check server on port 9000 that has /health on
    was1 only (404 on was2), while both service ports answer 200 to any path."""
    checks = []
    for node, files in (("was1", ["health"]), ("was2", [])):
        root = tmp_path / node
        root.mkdir()
        for name in files:
            (root / name).write_text("ok\n")
        checks.append(lab.listening(node, 9000, PY, "-m", "http.server", "9000",
                                    "--directory", str(root)))
    try:
        with lab.xlb("--vip", f"{VIP}:80", "--backend", "10.1.11.101:8080",
                     "--backend", "10.1.11.102:8080", "--check", "http:/health",
                     "--check-port", "9000", "--interval", "0.5", "--rise", "3",
                     "--fall", "4"):
            wait_health(lab, "backend2", "down")
            st = lab.status()["pools"][0]["servers"]
            assert [s["health"] for s in st] == ["up", "down"]
            assert "404" in st[1]["last_check"]["reason"], st[1]
            assert lab.client("client", "http", VIP, "80", "--count", "4")["names"] == \
                ["WAS1"] * 4
            shown = tomllib.loads(lab.xlb_cmd("show", check=True).stdout)
        (monitor,) = shown["monitors"].values()
        assert {k: monitor[k] for k in ("type", "path", "port", "interval", "rise", "fall")} \
            == {"type": "http", "path": "/health", "port": 9000, "interval": 0.5,
                "rise": 3, "fall": 4}
    finally:
        for proc in checks:
            proc.terminate()
            proc.wait(5)


@pytest.mark.parametrize("policy,drained", [("keep", False), ("reset", False),
                                            ("reset", True)])
def test_established_flows_of_a_server_that_goes_down_follow_on_server_down(
        lab, tmp_path, policy, drained):
    """Only the check listener (port 9000) of the held connection's server
    dies; the server itself still answers. keep: the connection goes on with
    it. reset: its next packet is balanced anew, to a server that knows
    nothing of it, and the connection ends; also when the server was drained
    first (drain keeps flows only for a server that passes its checks)."""
    checks = {node: lab.web_server(node, f"{node}-check", 9000) for node in ("was1", "was2")}
    try:
        text = seed("tcp", port=9000).replace('monitor = "m"\n',
                                              f'monitor = "m"\non_server_down = "{policy}"\n')
        with start_xlb(lab, tmp_path, text):
            wait_health(lab, "was2", "up")
            hold, first = lab.hold("--count", "12", "--step", "--timeout", "2")
            server = {"WAS1": "was1", "WAS2": "was2"}[first]
            if drained:
                lab.xlb_cmd("server", "drain", "web", server, check=True)
            checks[server].terminate()
            checks[server].wait(5)
            wait_health(lab, server, "down")
            rest = [json.loads(line)
                    for line in hold.communicate("\n" * 11, timeout=30)[0].splitlines()]
        if policy == "keep":
            assert [r.get("name") for r in rest] == [first] * 11, rest
        else:
            assert any("error" in r for r in rest), rest
            # after the reset, requests (on a new connection) go to the other server
            assert rest[-1]["name"] != first, rest
    finally:
        for proc in checks.values():
            proc.terminate()
            proc.wait(5)
