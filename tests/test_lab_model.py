"""The operator's model end to end in the lab: config files, apply under load,
drain, disable, backups and weights, with real servers and clients."""

from __future__ import annotations

import json
import os
import re

import pytest

from labctl import HERE, PY, VIP, even_split, running_lab, xlb_ok

from xlb import config as config_module

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

# name -> (address, port, answer)
SERVERS = {"was1": ("10.1.11.101", 8080, "WAS1"), "was2": ("10.1.11.102", 8080, "WAS2"),
           "was1b": ("10.1.11.101", 8081, "WAS1B"), "was2b": ("10.1.11.102", 8081, "WAS2B")}


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbm") as lab:
        # WAS1B and WAS2B: more servers, on port 8081 of the WAS hosts (lab.down ends them)
        lab.web_server("was1", "WAS1B", 8081)
        lab.web_server("was2", "WAS2B", 8081)
        yield lab


def config(pools: dict, frontends: dict, servers: dict | None = None) -> str:
    """TOML for pools {name: (algorithm, policy, [server or (server, weight, backup)])}
    and frontends {name: (vip, port, pool)}."""
    out = []
    for name, (addr, port, _) in SERVERS.items():
        weight, backup = (servers or {}).get(name, (1, False))
        out.append(f'[servers.{name}]\naddress = "{addr}"\nport = {port}\n'
                   f'weight = {weight}\nbackup = {str(backup).lower()}\n')
    for name, (algorithm, policy, members) in pools.items():
        out.append(f'[pools.{name}]\nservers = {json.dumps(members)}\n'
                   f'algorithm = "{algorithm}"\non_server_down = "{policy}"\n')
    for name, (vip, port, pool) in frontends.items():
        out.append(f'[frontends.{name}]\nvip = "{vip}"\nport = {port}\npool = "{pool}"\n')
    return "\n".join(out)


SEED = config({"web": ("roundrobin", "keep", ["was1", "was2"])}, {"www": (VIP, 80, "web")})


@pytest.fixture
def xlb(lab, tmp_path, monkeypatch):
    # A fresh state directory: no drain or maint of an earlier test comes back.
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "xlb.toml"
    path.write_text(SEED)
    with lab.xlb("--config", str(path)) as x:
        x.path = path
        yield x
    assert lab.xdp_attached("lb") == []


def apply(lab, tmp_path, text: str) -> str:
    f = tmp_path / "next.toml"
    f.write_text(text)
    return xlb_ok(lab, "apply", str(f))


def names(lab, count=40, port=80, vip=VIP) -> dict:
    out = lab.client("client", "http", vip, str(port), "--count", str(count))
    assert out["errors"] == []
    return {n: out["names"].count(n) for n in set(out["names"])}


def test_seed_config_serves_round_robin(lab):
    with lab.xlb("--config", str(HERE / "seed.toml")):
        assert even_split(names(lab, 20), {"WAS1", "WAS2"}, 20)
        st = lab.status()
        assert [f["name"] for f in st["frontends"]] == ["www"]
        assert [s["name"] for s in st["pools"][0]["servers"]] == ["was1", "was2"]


@pytest.mark.parametrize("keepalive", [False, True], ids=["close", "keepalive"])
def test_applies_under_load_lose_no_request(lab, xlb, tmp_path, keepalive):
    """Add, reweight and remove servers, switch between a ring and a Maglev
    table, between Maglev tables and between maglev and source, add and remove
    a frontend, 27 times in all (three rounds), while clients keep sending:
    not one request fails."""
    steps = [
        config({"web": ("roundrobin", "keep", ["was1", "was2", "was1b"])},
               {"www": (VIP, 80, "web")}),
        config({"web": ("weighted", "keep", ["was1", "was2", "was1b"])},
               {"www": (VIP, 80, "web")}, {"was1": (3, False)}),
        config({"web": ("weighted", "keep", ["was1", "was2"])}, {"www": (VIP, 80, "web")},
               {"was1": (3, False)}),
        config({"web": ("maglev", "keep", ["was1", "was2", "was2b"])},   # to a Maglev table
               {"www": (VIP, 80, "web")}, {"was1": (2, False)}),
        config({"web": ("maglev", "keep", ["was1", "was2"])}, {"www": (VIP, 80, "web")}),
        # the same table picked by the client's address: the service's flag alone
        config({"web": ("source", "keep", ["was1", "was2"])}, {"www": (VIP, 80, "web")}),
        config({"web": ("source", "keep", ["was1", "was2", "was2b"])},
               {"www": (VIP, 80, "web")}),
        config({"web": ("roundrobin", "keep", ["was1", "was2"]),
                "alt": ("roundrobin", "keep", ["was2b"])},
               {"www": (VIP, 80, "web"), "alt": ("10.1.1.102", 80, "alt")}),
        SEED,
    ]
    args = ["--seconds", "12", "--concurrency", "8"] + (["--keepalive"] if keepalive else [])
    load = lab.spawn("client", PY, str(HERE / "clients.py"), "load", VIP, "80", *args)
    try:
        for step in steps * 3:
            out = apply(lab, tmp_path, step)
            assert "applied" in out
    finally:
        stdout, stderr = load.communicate(timeout=60)
    result = json.loads(stdout)
    assert result["error_count"] == 0, result["errors"]
    assert result["ok"] > 100
    assert set(result["names"]) <= {"WAS1", "WAS2", "WAS1B", "WAS2B"}


def shape(status: dict) -> tuple:
    """What a config decides, without the counters."""
    return ([(f["name"], f["vip"], f["port"], f["pool"]) for f in status["frontends"]],
            [(p["name"], p["algorithm"], [(s["name"], s["state"], s["weight"])
                                          for s in p["servers"]]) for p in status["pools"]])


def test_apply_of_an_invalid_file_changes_nothing(lab, xlb, tmp_path):
    before = lab.status()
    bad = tmp_path / "bad.toml"
    bad.write_text(SEED.replace('pool = "web"', 'pool = "nosuch"'))
    r = lab.xlb_cmd("apply", str(bad))
    assert r.returncode == 2
    assert "frontends.www.pool" in r.stderr and "nothing applied" in r.stderr
    assert shape(lab.status()) == shape(before)
    assert xlb.path.read_text() == SEED
    assert even_split(names(lab, 10), {"WAS1", "WAS2"}, 10)


def test_apply_of_the_largest_file_of_control_characters_names_its_problem(lab, xlb, tmp_path):
    """A file of NUL bytes (what a crash can leave of one) as large as a config
    may be: JSON writes each byte as six (\\u0000), and the request was refused
    as oversized, exit 1, neither the file nor its problem named."""
    before = lab.status()
    zeros = tmp_path / "zeros.toml"
    zeros.write_bytes(b"\0" * config_module.MAX_FILE)
    r = lab.xlb_cmd("apply", str(zeros))
    assert (r.returncode, r.stderr) == (2, f"{zeros}: toml: Invalid statement (at line 1, "
                                           f"column 1)\nxlb: error: invalid config: nothing "
                                           f"applied\n")
    assert shape(lab.status()) == shape(before)


@pytest.fixture
def local_route(lab):
    """lb routes 10.9.0.0/16 to itself (AnyIP), as `ip route add local` does."""
    lab.run("lb", "ip", "route", "add", "local", "10.9.0.0/16", "dev", "lo", check=True)
    yield
    lab.run("lb", "ip", "route", "del", "local", "10.9.0.0/16", "dev", "lo")


def test_apply_of_a_vip_the_kernel_owns_changes_nothing(lab, xlb, tmp_path, local_route):
    """Not only a link's address: a subnet's broadcast address, an address of a
    local route. Refused as a local address is, and the instance serves on."""
    before = lab.status()
    bad = tmp_path / "bad.toml"
    for vip, message in (
            ("10.1.1.255", "xlb: error: VIP 10.1.1.255 is a broadcast address of this host "
                           "(of eth0's subnet): no client can reach a server there\n"),
            ("10.9.1.1", "xlb: error: VIP 10.9.1.1 is a local address (local route "
                         "10.9.0.0/16 on lo): reverse-NATed replies would look martian; "
                         "remove it from the host\n")):
        bad.write_text(SEED.replace(f'vip = "{VIP}"', f'vip = "{vip}"'))
        r = lab.xlb_cmd("apply", str(bad))
        assert (r.returncode, r.stderr) == (2, message)
    assert shape(lab.status()) == shape(before)
    assert even_split(names(lab, 10), {"WAS1", "WAS2"}, 10)


def held_connection(lab, *args):
    """lab.hold(*args): the process, its first answer, the server it came from,
    and the other server's answer."""
    hold, first = lab.hold(*args)
    server = {"WAS1": "was1", "WAS2": "was2"}[first]
    other = "WAS2" if server == "was1" else "WAS1"
    return hold, first, server, other


def test_drain_lets_an_open_connection_finish(lab, xlb):
    hold, first, server, other = held_connection(lab, "--count", "6", "--step")
    out = xlb_ok(lab, "server", "drain", "web", server)
    assert f"web/{server} is drain" in out
    # New connections go to the other server only...
    assert names(lab, 10) == {other: 10}
    # ...while the open one keeps its server to the end.
    rest = [json.loads(line) for line in hold.communicate("\n" * 5, timeout=30)[0].splitlines()]
    assert [r.get("name") for r in rest] == [first] * 5
    assert next(s for s in lab.status()["pools"][0]["servers"]
                if s["name"] == server)["state"] == "drain"
    xlb_ok(lab, "server", "enable", "web", server)
    assert even_split(names(lab, 10), {"WAS1", "WAS2"}, 10)


def test_disable_stops_new_flows_and_ends_open_ones(lab, xlb):
    hold, first, server, other = held_connection(lab, "--count", "3", "--step",
                                                 "--timeout", "2")
    out = xlb_ok(lab, "server", "disable", "web", server)
    assert f"web/{server} is maint" in out
    # The command returns once the maps are written: new flows avoid it at once.
    assert names(lab, 10) == {other: 10}
    rest = [json.loads(line) for line in hold.communicate("\n" * 2, timeout=30)[0].splitlines()]
    # The open connection's next packet is balanced anew, to a server that
    # knows nothing of it: the connection ends instead of going on.
    assert "error" in rest[0], rest
    # The runtime state survives an apply.
    xlb_ok(lab, "apply", str(xlb.path))
    assert names(lab, 6) == {other: 6}
    xlb_ok(lab, "server", "enable", "web", server)
    assert even_split(names(lab, 10), {"WAS1", "WAS2"}, 10)


def test_disable_of_the_last_server_up_drops_its_open_connection_unreset(lab, xlb):
    """No server of the pool left to take new flows: the packets of the
    connection that the disable ended are dropped (drop_no_backend), not
    reset, and its client times out."""
    xlb_ok(lab, "server", "disable", "web", "was2")
    hold, first = lab.hold("--count", "2", "--step", "--timeout", "2")
    assert first == "WAS1"
    assert "1 flows ended" in xlb_ok(lab, "server", "disable", "web", "was1")
    rest = [json.loads(line) for line in hold.communicate("\n", timeout=30)[0].splitlines()]
    assert [r.get("error") for r in rest] == ["TimeoutError: timed out"], rest
    assert lab.status()["reasons"]["drop_no_backend"]["packets"] > 0
    # The client aborted it (clients.abort): closed, its request would be sent
    # again for minutes, into the next tests' instances, and to was1, which
    # holds the connection still, brought back to life (counted open there).
    assert lab.run("client", "ss", "-Htn", "state", "fin-wait-1", "dst", VIP,
                   check=True).stdout == ""


def test_renaming_servers_and_their_pool_keeps_open_connections(lab, tmp_path, xlb):
    """Under on_server_down = "reset": was1 renamed was-1, and the pool web
    renamed www-pool, are the same real servers; an open connection goes on
    with its server, counted as that server's under its new name."""
    reset = SEED.replace('"keep"', '"reset"')
    apply(lab, tmp_path, reset)
    hold, first, server, other = held_connection(lab, "--count", "6", "--step",
                                                 "--timeout", "2")
    renamed = (reset.replace("[servers.was1]", "[servers.was-1]")
               .replace('["was1", "was2"]', '["was-1", "was2"]')
               .replace("[pools.web]", "[pools.www-pool]")
               .replace('pool = "web"', 'pool = "www-pool"'))
    assert "; 0 flows ended;" in apply(lab, tmp_path, renamed)
    pool = lab.status()["pools"][0]
    name = {"was1": "was-1", "was2": "was2"}[server]
    assert pool["name"] == "www-pool"
    assert {s["name"]: s["active_flows"] for s in pool["servers"]}[name] == 1
    rest = [json.loads(line) for line in hold.communicate("\n" * 5, timeout=30)[0].splitlines()]
    assert [r.get("name") for r in rest] == [first] * 5, rest
    assert even_split(names(lab, 10), {"WAS1", "WAS2"}, 10)


def test_backups_take_over_when_every_primary_is_disabled(lab, tmp_path, xlb):
    apply(lab, tmp_path, config({"web": ("roundrobin", "keep", ["was1", "was2", "was2b"])},
                                {"www": (VIP, 80, "web")}, {"was2b": (1, True)}))
    assert even_split(names(lab, 10), {"WAS1", "WAS2"}, 10)
    xlb_ok(lab, "server", "disable", "web", "was1")
    xlb_ok(lab, "server", "disable", "web", "was2")
    assert names(lab, 10) == {"WAS2B": 10}
    xlb_ok(lab, "server", "enable", "web", "was2")
    assert names(lab, 10) == {"WAS2": 10}


def test_weights_three_to_one(lab, tmp_path, xlb):
    apply(lab, tmp_path, config({"web": ("weighted", "keep", ["was1", "was2"])},
                                {"www": (VIP, 80, "web")}, {"was1": (3, False)}))
    # The ring is 3:1, walked by one cursor (the client sends from one CPU).
    assert names(lab, 200) == {"WAS1": 150, "WAS2": 50}


def test_source_sends_every_connection_of_a_client_to_one_server(lab, tmp_path, xlb):
    """The client's connections, each from a new port: with "source" all reach
    the one server of its address, with "maglev" (the whole flow hashed) both."""
    web = ["was1", "was2"]
    apply(lab, tmp_path, config({"web": ("source", "keep", web)}, {"www": (VIP, 80, "web")}))
    (reached,) = names(lab, 40).items()
    assert reached[0] in {"WAS1", "WAS2"} and reached[1] == 40
    apply(lab, tmp_path, config({"web": ("maglev", "keep", web)}, {"www": (VIP, 80, "web")}))
    assert set(names(lab, 40)) == {"WAS1", "WAS2"}


def test_many_frontends_each_with_its_own_pool(lab, tmp_path, xlb):
    apply(lab, tmp_path, config(
        {"a": ("roundrobin", "keep", ["was1"]), "b": ("roundrobin", "keep", ["was2"]),
         "c": ("roundrobin", "keep", ["was1b", "was2b"])},
        {"www": (VIP, 80, "a"), "alt": (VIP, 8080, "b"), "other": ("10.1.1.102", 80, "c")}))
    assert names(lab, 4) == {"WAS1": 4}
    assert names(lab, 4, port=8080) == {"WAS2": 4}
    # Both of its pool's servers, and only those: how evenly round-robin
    # spreads is what the tests above check.
    other = names(lab, 4, vip="10.1.1.102")
    assert set(other) == {"WAS1B", "WAS2B"} and sum(other.values()) == 4, other


# Only what differs from the defaults.
MINIMAL = f"""
[monitors.m]
type = "tcp"
interval = 5
[servers.was1]
address = "10.1.11.101"
port = 8080
[servers.was2]
address = "10.1.11.102"
port = 8080
[pools.web]
servers = ["was1", "was2"]
monitor = "m"
[frontends.www]
vip = "{VIP}"
port = 80
pool = "web"
"""


def test_show_prints_the_effective_config(lab, xlb, tmp_path):
    apply(lab, tmp_path, MINIMAL)
    shown = xlb_ok(lab, "show")
    # The defaults written out...
    for line in ('algorithm = "roundrobin"', 'on_server_down = "keep"', "weight = 1",
                 "backup = false", "enabled = true", 'protocol = "tcp"', "rise = 2",
                 "fall = 3", "timeout = 1.0"):
        assert line in shown.splitlines(), (line, shown)
    # ...and what it prints is the config it serves: it loads back to the same.
    assert config_module.load(shown) == config_module.load(MINIMAL)


def test_server_command_errors(lab, xlb):
    r = lab.xlb_cmd("server", "drain", "web", "nosuch")
    assert r.returncode == 2 and "no server 'nosuch' in pool 'web'" in r.stderr
    r = lab.xlb_cmd("server", "drain", "nosuch", "was1")
    assert r.returncode == 2 and "no pool 'nosuch'" in r.stderr


def test_enable_or_drain_of_a_server_the_file_disables_says_it_stays_maint(lab, tmp_path, xlb):
    """A run-time state does not override the file's `enabled = false`: the
    command's answer says why the server is still maint."""
    apply(lab, tmp_path, SEED.replace("[servers.was1]\n", "[servers.was1]\nenabled = false\n"))
    for action in ("enable", "drain"):
        r = lab.xlb_cmd("server", action, "web", "was1")
        assert (r.returncode, r.stdout) == (0, "xlb: web/was1 is maint; 0 flows ended\n")
        assert r.stderr == ("xlb: warning: web/was1 stays maint: the config disables it "
                            "(enabled = false); enable it there, then `xlb apply`\n")
    assert names(lab, 10) == {"WAS2": 10}


LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def events(stderr: str) -> list[dict]:
    """The logfmt lines of xlb's stderr, as dicts (quoted values unquoted)."""
    return [{k: json.loads(v) if v.startswith('"') else v for k, v in LOGFMT.findall(line)}
            for line in stderr.splitlines() if line.startswith("ts=")]


def test_start_apply_server_and_stop_are_logged(lab, tmp_path):
    path = tmp_path / "xlb.toml"
    path.write_text(SEED)
    bad = tmp_path / "bad.toml"
    bad.write_text(SEED.replace('pool = "web"', 'pool = "nosuch"'))
    x = lab.xlb("--config", str(path))
    with x:
        pid = str(lab.status()["pid"])
        apply(lab, tmp_path, SEED)
        assert lab.xlb_cmd("apply", str(bad)).returncode == 2
        xlb_ok(lab, "server", "drain", "web", "was1")
    got = [e for e in events(x.stderr) if e["event"] in ("start", "apply", "server", "stop")]
    assert [(e["event"], e["level"]) for e in got] == [
        ("start", "info"), ("apply", "info"), ("apply", "warning"), ("server", "info"),
        ("stop", "info")], x.stderr
    start, ok, refused, server, stop = got
    assert {k: start[k] for k in ("pid", "frontends", "servers", "interfaces", "config",
                                  "metrics")} == \
        {"pid": pid, "frontends": "1", "servers": "2", "interfaces": "eth0,eth1",
         "config": str(path), "metrics": "127.0.0.1:9717"}
    assert {k: ok[k] for k in ("result", "frontends", "pools", "servers", "flows_ended")} == \
        {"result": "ok", "frontends": "1", "pools": "1", "servers": "2", "flows_ended": "0"}
    assert refused["error"] == "invalid config: nothing applied" and refused["problems"] == "1"
    assert {k: server[k] for k in ("action", "pool", "server", "state")} == \
        {"action": "drain", "pool": "web", "server": "was1", "state": "drain"}
    assert stop["pid"] == pid
