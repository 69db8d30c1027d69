"""The config file: load, validation messages, dump. No kernel, no root."""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from xlb.config import dump, load, load_file
from xlb.model import Config, ConfigError, Frontend, Monitor, Pool, Server, from_flags

SEED = Path(__file__).resolve().parent.parent / "netns-lab" / "seed.toml"


def test_seed_file():
    was1 = Server("was1", IPv4Address("10.1.11.101"), 8080)
    was2 = Server("was2", IPv4Address("10.1.11.102"), 8080)
    expected = Config(
        monitors=(Monitor("was-http", type="http", port=8080, path="/", expect_status=200,
                          interval=2.0, timeout=1.0, rise=2, fall=3),),
        pools=(Pool("was", (was1, was2), algorithm="roundrobin", monitor="was-http",
                    on_server_down="keep"),),
        frontends=(Frontend("www", IPv4Address("10.1.1.101"), 80, "tcp", "was"),),
    )
    cfg = load_file(SEED)
    assert cfg == expected
    assert load_file(str(SEED)) == expected
    assert cfg.attach_names() == ()
    pool = cfg.pool("was")
    assert [cfg.monitor_for(pool, s).name for s in pool.servers] == ["was-http", "was-http"]


def readmes_example() -> str:
    readme = (SEED.parent.parent / "README.md").read_text()
    example = readme[readme.index("```toml\n") + len("```toml\n"):]
    return example[:example.index("```")]


def test_the_readmes_example_is_the_seed():
    """README's example of the file is `netns-lab/seed.toml`, as it says."""
    assert load(readmes_example()) == load_file(SEED)


def test_the_readmes_example_names_every_key():
    """Each section of README's example names every key the file takes there
    (the fields of its objects), set or in its comments ("also: ..."): none
    goes undocumented."""
    tables: dict[str, str] = {}
    for table in re.split(r"^(?=\[)", readmes_example(), flags=re.M)[1:]:
        section = table[1:table.index(".")]
        tables[section] = tables.get(section, "") + table
    kinds = {"monitors": Monitor, "servers": Server, "pools": Pool, "frontends": Frontend}
    assert set(tables) == set(kinds)
    missing = [f"{section}.{f.name}" for section, kind in kinds.items()
               for f in dataclasses.fields(kind)
               if f.name != "name" and not re.search(rf"\b{f.name}\b", tables[section])]
    assert missing == []


FULL = r'''
[monitors.web-http]
type = "http"
port = 8081
path = "/health?full=1"
expect_status = 204
expect_body = "say \"OK\" \\ tab\there\nnext line é \u0001 \u007F"
host = "www.example.com"
interval = 5
timeout = 2.5
rise = 1
fall = 10

[monitors.tcp-only]
type = "tcp"
interval = 0.5
timeout = 0.5

[monitors.off]
type = "none"

[servers.was1]
address = "10.1.11.101"
port = 8080
weight = 256
monitor = "tcp-only"
backup = false
enabled = true

[servers."was2.v2"]
address = "10.1.11.102"
port = 65535
weight = 1
backup = true
enabled = false

[servers.db_1]
address = "10.1.12.201"
port = 5432

[servers.unused]
address = "10.1.11.200"
port = 1

[pools."web.v2"]
servers = ["was2.v2", "was1"]
algorithm = "weighted"
monitor = "web-http"
on_server_down = "reset"

[pools.db]
servers = ["db_1", "was1"]

[pools.hashed]
servers = ["was1", "db_1"]
algorithm = "maglev"
maglev_size = 211

[frontends.www]
vip = "10.1.1.101"
port = 80
protocol = "tcp"
pool = "web.v2"
interfaces = ["eth0", "eth1.100", "br-ext_0"]
timeout_syn = 1
timeout_established = 604800
timeout_closing = 30

[frontends.www-udp]
vip = "10.1.1.101"
port = 80
protocol = "udp"
pool = "web.v2"
timeout_udp = 5

[frontends.0db]
vip = "10.1.1.102"
port = 5432
pool = "db"
'''


def test_full_example():
    cfg = load(FULL)
    assert [m.name for m in cfg.monitors] == ["web-http", "tcp-only", "off"]
    assert [p.name for p in cfg.pools] == ["web.v2", "db", "hashed"]
    assert [f.name for f in cfg.frontends] == ["www", "www-udp", "0db"]
    m = cfg.monitors[0]
    assert m.expect_body == 'say "OK" \\ tab\there\nnext line é \x01 \x7f'
    assert (m.interval, m.timeout) == (5.0, 2.5) and type(m.interval) is float
    assert cfg.monitors[2] == Monitor("off", type="none")
    web, db, hashed = cfg.pools
    was2, was1 = web.servers
    assert db.servers[1] is was1           # one server, two pools
    assert was2 == Server("was2.v2", IPv4Address("10.1.11.102"), 65535, backup=True,
                          enabled=False)
    assert (web.algorithm, web.on_server_down, db.algorithm, db.monitor) == (
        "weighted", "reset", "roundrobin", None)
    assert (hashed.algorithm, hashed.maglev_size, db.maglev_size) == ("maglev", 211, 65537)
    assert cfg.frontends[0].interfaces == ("eth0", "eth1.100", "br-ext_0")
    assert cfg.frontends[0].timeouts == (1, 604800, 30, 300)
    assert cfg.frontends[1].timeouts == (60, 900, 120, 5)
    assert cfg.frontends[2].protocol == "tcp"
    assert cfg.attach_names() == ("eth0", "eth1.100", "br-ext_0")


def test_full_example_round_trips():
    cfg = load(FULL)
    text = dump(cfg)
    assert load(text) == cfg
    assert dump(load(text)) == text
    assert "unused" not in text            # only the pools' servers exist in a Config
    assert text.index("[servers.\"was2.v2\"]") < text.index("[servers.was1]") < text.index(
        "[servers.db_1]")
    assert text.count("[servers.was1]") == 1
    assert text.count("maglev_size") == 1   # written for the maglev pool only


def test_what_nothing_uses_is_named_not_refused():
    assert load(FULL).warnings == (
        ("servers.unused", "in no pool: it serves nothing, and `xlb show` leaves it out"),
        ("pools.hashed", "no frontend uses it: it serves nothing"),
        ("monitors.off", "no pool or server uses it"))
    # A monitor that only a server names is used.
    assert "monitors.tcp-only" not in dict(load(FULL).warnings)
    assert load_file(SEED).warnings == ()


def test_a_pool_of_disabled_servers_only_is_named_not_refused():
    """Its frontends drop every new connection until the file enables one
    (`xlb server enable` does not: the file's maint stays)."""
    off = SERVER + "\nport = 8080\nenabled = false"
    assert load(doc(server=off)).warnings == (
        ("pools.web", "every server of it is enabled = false: it serves nothing"),)
    assert load(doc(server=off, pool='servers = ["was1", "was2"]',
                    extra='[servers.was2]\naddress = "10.1.11.102"\nport = 8080')
                ).warnings == ()


def test_a_pool_monitor_that_every_server_overrides_is_named_not_refused():
    """It checks none of them (a server's own monitor replaces it): the
    operator may believe both check. A server added later without one would
    take it, so it is said, not refused."""
    own = 'monitor = "tcp"\n'
    text = doc("[monitors.tcp]\n[monitors.http]\ntype = \"http\"",
               server=SERVER + "\nport = 8080\n" + own, pool=POOL + '\nmonitor = "http"',
               extra='[servers.was2]\naddress = "10.1.11.102"\nport = 8080\n' + own
                     + '[pools.both]\nservers = ["was1", "was2"]\nmonitor = "http"\n')
    unused = ("pools.both", "no frontend uses it: it serves nothing")
    overridden = "every server of it names its own monitor: monitors.http checks none of them"
    assert load(text).warnings == (unused, ("pools.web.monitor", overridden),
                                   ("pools.both.monitor", overridden))
    assert load(text.replace("port = 8080\n" + own + "[pools", "port = 8080\n[pools")
                ).warnings == (unused, ("pools.web.monitor", overridden))


def test_a_pool_monitor_that_its_servers_name_too_is_not_said_to_check_none():
    """Servers that each name a monitor, the pool's among them: it does check
    them (through their own), so no warning says it checks none."""
    text = doc("[monitors.tcp]\n[monitors.http]\ntype = \"http\"",
               server=SERVER + '\nport = 8080\nmonitor = "http"\n',
               pool=POOL + '\nmonitor = "http"',
               extra='[servers.was2]\naddress = "10.1.11.102"\nport = 8080\nmonitor = "tcp"\n'
                     '[pools.both]\nservers = ["was1", "was2"]\nmonitor = "http"\n')
    assert load(text).warnings == (("pools.both", "no frontend uses it: it serves nothing"),)


def test_an_http_monitor_without_expect_status_takes_any_2xx_or_3xx_and_round_trips():
    cfg = load(doc(monitor('type = "http"'), pool=POOL + '\nmonitor = "m"'))
    assert cfg.monitors[0].expect_status is None
    assert "expect_status" not in dump(cfg) and load(dump(cfg)) == cfg


def test_an_https_monitor_takes_the_http_keys_and_round_trips():
    """https is http over TLS: the same keys, written back; udp's are not its."""
    cfg = load(doc(monitor('type = "https"', "port = 8443", 'path = "/health"',
                           "expect_status = 204", 'expect_body = "ok"', 'host = "svc.example"'),
                   pool=POOL + '\nmonitor = "m"'))
    (m,) = cfg.monitors
    assert (m.type, m.port, m.path, m.expect_status, m.expect_body, m.host) == \
        ("https", 8443, "/health", 204, "ok", "svc.example")
    assert ('type = "https"\nport = 8443\npath = "/health"\nexpect_status = 204\n'
            'expect_body = "ok"\nhost = "svc.example"\n') in dump(cfg)
    assert load(dump(cfg)) == cfg and cfg.warnings == ()
    with pytest.raises(ConfigError) as e:
        load(doc(monitor('type = "https"', 'send_hex = "1b"'), pool=POOL + '\nmonitor = "m"'))
    assert e.value.problems == [("monitors.m.send_hex", 'only for type "udp"')]


NTP = '[monitors.m]\ntype = "udp"\nsend_hex = """\n1b 00 00 00\n00 00 00 00\n"""\nexpect_hex = "1C"'
DNS = '[frontends.dns]\nvip = "10.1.1.101"\nport = 53\nprotocol = "udp"\npool = "web"\n'


def test_a_udp_monitor_takes_hex_with_whitespace_and_round_trips():
    cfg = load(doc(NTP, pool=POOL + '\nmonitor = "m"', frontend=DNS[len("[frontends.dns]\n"):]))
    (m,) = cfg.monitors
    assert (m.type, m.send_hex, m.expect_hex) == ("udp", "1b" + "00" * 7, "1c")
    assert 'send_hex = "1b00000000000000"\nexpect_hex = "1c"\n' in dump(cfg)
    assert load(dump(cfg)) == cfg and cfg.warnings == ()
    # expect_hex is optional: any reply passes
    cfg = load(doc(NTP.replace('expect_hex = "1C"', ""), pool=POOL + '\nmonitor = "m"',
                   frontend=DNS[len("[frontends.dns]\n"):]))
    assert cfg.monitors[0].expect_hex is None and "expect_hex" not in dump(cfg)
    assert load(dump(cfg)) == cfg


def test_a_udp_monitor_of_tcp_frontends_alone_on_the_servers_port_is_said():
    """Checked over UDP on their own port, servers of a TCP service alone
    answer port unreachable: all go down. Said, not refused (a DNS server
    serves its port over both); a port given, or a UDP frontend, silences it."""
    tcp_only = load(doc(NTP, pool=POOL + '\nmonitor = "m"'))
    assert tcp_only.warnings == (
        ("monitors.m", "it checks the servers of pools.web over UDP on their own port, and "
                       "every frontend of that pool is TCP: a server of TCP alone there answers "
                       "port unreachable and goes down (give the monitor its port)"),)
    assert load(doc(NTP + "\nport = 53", pool=POOL + '\nmonitor = "m"')).warnings == ()
    assert load(doc(NTP, pool=POOL + '\nmonitor = "m"', extra=DNS)).warnings == ()
    # a server's own monitor, once for its pool
    own = load(doc(NTP, server=SERVER + '\nport = 8080\nmonitor = "m"'))
    assert [path for path, _ in own.warnings] == ["monitors.m"]


def test_a_monitor_of_no_type_of_udp_frontends_alone_on_the_servers_port_is_said():
    """No type is tcp, which the operator may not have chosen (as the one-line
    form's default check): a server of UDP alone refuses the connect. A type
    or a port given silences it, as does a TCP frontend of the pool."""
    dns_only = dict(pool=POOL + '\nmonitor = "m"', frontend=DNS[len("[frontends.dns]\n"):])
    assert load(doc("[monitors.m]", **dns_only)).warnings == (
        ("monitors.m", "no type: by default it checks the servers of pools.web over TCP on "
                       "their own port, and every frontend of that pool is UDP: a server of UDP "
                       "alone there refuses the connect and goes down (give the monitor its "
                       "port, or its type)"),)
    for given in ('type = "tcp"', "port = 53"):
        assert load(doc("[monitors.m]\n" + given, **dns_only)).warnings == ()
    assert load(doc("[monitors.m]", pool=POOL + '\nmonitor = "m"', extra=DNS)).warnings == ()


# What an earlier build's `dump` wrote of a `none` monitor (given interval 5 and port 1).
NONE_DUMPED = ('[monitors.m]\ntype = "none"\nport = 1\ninterval = 5.0\ntimeout = 1.0\n'
               'rise = 2\nfall = 3\n')


def test_a_none_monitor_dumps_and_loads_back_without_check_settings():
    """It refuses them (below); xlb's own state may hold an earlier build's
    dump with them, which a restart or an upgrade must still take over."""
    cfg = load(doc(monitor('type = "none"'), pool=POOL + '\nmonitor = "m"'))
    assert dump(cfg).startswith('[monitors.m]\ntype = "none"\n\n') and load(dump(cfg)) == cfg
    earlier = doc(NONE_DUMPED, pool=POOL + '\nmonitor = "m"')
    assert load(earlier, dumped=True) == cfg
    with pytest.raises(ConfigError):
        load(earlier)
    # A monitor that checks keeps its own: a restart checks as the file said.
    checking = load(doc(monitor("port = 9000", "interval = 5", "timeout = 2", "rise = 4",
                                "fall = 6"), pool=POOL + '\nmonitor = "m"'))
    assert load(dump(checking), dumped=True) == checking


def test_maglev_pool_default_size_round_trips():
    cfg = load(doc(pool=POOL + '\nalgorithm = "maglev"'))
    assert cfg.pools[0].maglev_size == 65537
    assert 'maglev_size = 65537' in dump(cfg) and load(dump(cfg)) == cfg


# What an earlier build's `dump` wrote of every frontend: the four timeouts, each
# protocol's and the other's (as an operator's `timeout_established = 30` on UDP).
TIMEOUTS_DUMPED = ("timeout_syn = 5\ntimeout_established = 30\ntimeout_closing = 7\n"
                   "timeout_udp = 9\n")
DNS = '[frontends.dns]\nvip = "10.1.1.101"\nport = 53\nprotocol = "udp"\npool = "web"\n'
ONLY_TCP = 'only for protocol "tcp" (UDP flows take timeout_udp): ignored'
ONLY_UDP = ('only for protocol "udp" (TCP flows take timeout_syn, timeout_established '
            'or timeout_closing): ignored')


def test_a_frontend_dumps_only_the_timeouts_of_its_protocol():
    """The others act on no flow of it: load warns of them (below)."""
    cfg = load(doc(frontend=FE + "\ntimeout_established = 30", extra=DNS + "timeout_udp = 9"))
    text = dump(cfg)
    www, dns = text[text.index("[frontends.www]"):text.index("[frontends.dns]")], \
        text[text.index("[frontends.dns]"):]
    assert re.findall(r"^timeout_\w+ = \d+$", www, re.M) == [
        "timeout_syn = 60", "timeout_established = 30", "timeout_closing = 120"]
    assert re.findall(r"^timeout_\w+ = \d+$", dns, re.M) == ["timeout_udp = 9"]
    assert load(text) == cfg


def test_an_earlier_dump_with_every_timeout_loads_back():
    """xlb's state may hold an earlier build's dump, which wrote all four for
    every frontend: a restart or an upgrade takes it over, the other
    protocol's timeouts dropped (they acted on nothing)."""
    earlier = doc(frontend=FE + "\n" + TIMEOUTS_DUMPED, extra=DNS + TIMEOUTS_DUMPED)
    cfg = load(earlier, dumped=True)
    assert [f.timeouts for f in cfg.frontends] == [(5, 30, 7, 300), (60, 900, 120, 9)]
    assert cfg.warnings == ()
    assert load(earlier).frontends == cfg.frontends      # a file made of it: warned of


def test_an_earlier_dump_with_a_weight_that_roundrobin_ignored_loads_back():
    """A build before `xlb check` refused it took a weight that no pool of its
    server honours (roundrobin gives every server the same share) and
    ignored it; its dump, in xlb's state, has it. A bare `xlb up` after the
    upgrade refused that config (exit 2, the data path left without its
    control process): dropped there, as what acted on nothing. A weight that
    another pool of the server honours stays."""
    weighted = SERVER + "\nport = 8080\nweight = 3"
    earlier = doc(server=weighted)
    assert load(earlier, dumped=True) == load(doc())
    with pytest.raises(ConfigError):
        load(earlier)
    honoured = doc(server=weighted,
                   extra='[pools.w]\nservers = ["was1"]\nalgorithm = "weighted"')
    assert load(honoured, dumped=True) == load(honoured)
    assert load(honoured).pools[1].servers[0].weight == 3


def test_a_frontend_warns_of_the_timeouts_of_the_other_protocol():
    """A UDP flow takes timeout_udp alone, a TCP connection the other three
    (bpf/xlb.c state_timeout): the others would seem to act. Warned of, not
    refused: a file made of an earlier build's `xlb show` has all four."""
    cfg = load(doc(frontend=FE + "\ntimeout_udp = 9",
                   extra=DNS.replace('"udp"', '"UDP"')
                         + TIMEOUTS_DUMPED.replace("timeout_udp = 9\n", "")))
    assert cfg.warnings == (("frontends.www.timeout_udp", ONLY_UDP),
                            ("frontends.dns.timeout_syn", ONLY_TCP),
                            ("frontends.dns.timeout_established", ONLY_TCP),
                            ("frontends.dns.timeout_closing", ONLY_TCP))
    assert [f.timeouts for f in cfg.frontends] == [(60, 900, 120, 300)] * 2


def test_dump_is_canonical():
    assert dump(load_file(SEED)) == textwrap.dedent('''\
        [monitors.was-http]
        type = "http"
        port = 8080
        path = "/"
        expect_status = 200
        interval = 2.0
        timeout = 1.0
        rise = 2
        fall = 3

        [servers.was1]
        address = "10.1.11.101"
        port = 8080
        weight = 1
        backup = false
        enabled = true

        [servers.was2]
        address = "10.1.11.102"
        port = 8080
        weight = 1
        backup = false
        enabled = true

        [pools.was]
        servers = ["was1", "was2"]
        algorithm = "roundrobin"
        monitor = "was-http"
        on_server_down = "keep"

        [frontends.www]
        vip = "10.1.1.101"
        port = 80
        protocol = "tcp"
        pool = "was"
        interfaces = []
        timeout_syn = 60
        timeout_established = 900
        timeout_closing = 120
        adopt_replies = false
        ''')


NOT_IFNAME = "is not an interface name (not . or .., no '/', ':', '%' or whitespace)"


@pytest.mark.parametrize("body", [
    '"', "\\", "'", "'''", '"""', "\\u0041", "\t\r\n\b\f", "\x00\x1f\x7f", "é中🙂", "#x", "a=b",
    "\u2028\u0085",
])
def test_dump_escapes_strings(body):
    cfg = checking_for(body)
    assert load(dump(cfg)) == cfg


def test_dump_leaves_printable_text_as_it_is():
    """`xlb show` prints what the operator wrote: only quotes, backslashes and
    control characters are escaped."""
    text = "say OK, caf\u00e9 \u4e2d\U0001f642 #x a=b ~"
    assert f'expect_body = "{text}"\n' in dump(checking_for(text))


def checking_for(body: str) -> Config:
    """A config whose http monitor expects body."""
    cfg = load(textwrap.dedent('''\
        [monitors.m]
        type = "http"
        [servers.s]
        address = "10.0.0.1"
        port = 1
        [pools.p]
        servers = ["s"]
        monitor = "m"
        [frontends.f]
        vip = "10.0.0.2"
        port = 1
        pool = "p"
        '''))
    return Config(frontends=cfg.frontends, pools=cfg.pools,
                  monitors=(Monitor("m", type="http", expect_body=body),))


def test_dump_floats_read_back_as_floats():
    cfg = load_file(SEED)
    for interval, timeout in [(2, 1), (0.01, 0.01), (0.015, 0.0125), (86400, 3.0), (0.1, 0.1)]:
        c = Config(frontends=cfg.frontends, pools=cfg.pools,
                   monitors=(Monitor("was-http", interval=interval, timeout=timeout),))
        back = load(dump(c)).monitors[0]
        assert (back.interval, back.timeout) == (interval, timeout)
        assert type(back.interval) is float and type(back.timeout) is float


def test_the_one_line_form_dumps_to_a_file_that_loads_back():
    cfg = from_flags(["10.1.1.101:80", "10.1.1.101:80/udp"],
                     ["10.1.11.101:8080", "10.1.11.102:8080"], ["eth0"])
    assert load(dump(cfg)) == cfg


def test_adopt_replies_round_trips():
    cfg = load(doc(pool=POOL + '\nalgorithm = "maglev"', frontend=FE + "\nadopt_replies = true",
                   extra='[frontends.dns]\nvip = "10.1.1.101"\nport = 80\nprotocol = "udp"\n'
                         'pool = "web"'))
    assert [f.adopt_replies for f in cfg.frontends] == [True, False]   # udp: another endpoint
    assert load(dump(cfg)) == cfg


def test_source_pool_is_a_maglev_pool():
    """algorithm "source" takes maglev_size and adopt_replies as "maglev" does,
    and dumps them."""
    cfg = load(doc(pool=POOL + '\nalgorithm = "source"\nmaglev_size = 211',
                   frontend=FE + "\nadopt_replies = true"))
    (pool,), (fe,) = cfg.pools, cfg.frontends
    assert (pool.algorithm, pool.maglev_size, fe.adopt_replies) == ("source", 211, True)
    assert load(dump(cfg)) == cfg


def test_same_vip_and_port_on_both_protocols():
    cfg = load(doc(frontend=FE + "\n[frontends.udp]\n" + FE + '\nprotocol = "udp"'))
    assert [f.endpoint for f in cfg.frontends] == ["10.1.1.101:80/tcp", "10.1.1.101:80/udp"]


def test_protocol_in_either_case_as_vip_takes_it():
    """keepalived's virtual_server writes TCP; `xlb up --vip IP:PORT/TCP` takes it."""
    cfg = load(doc(frontend=FE + '\nprotocol = "UDP"',
                   extra="[frontends.b]\n" + FE + '\nprotocol = "Tcp"'))
    assert [f.protocol for f in cfg.frontends] == ["udp", "tcp"]
    assert [f.protocol for f in from_flags(["10.1.1.101:80/UDP", "10.1.1.101:80/Tcp"],
                                           ["10.1.11.101:8080"]).frontends] == ["udp", "tcp"]
    assert load(dump(cfg)) == cfg and 'protocol = "udp"' in dump(cfg)
    with pytest.raises(ConfigError) as e:
        load(doc(extra="[frontends.b]\n" + FE + '\nprotocol = "TCP"'))
    assert e.value.problems == [("frontends.b", "duplicate of frontends.www (10.1.1.101:80/tcp)")]


def test_load_file_missing(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as e:
        load_file(path)
    assert e.value.problems == [(str(path), "No such file or directory")]
    with pytest.raises(ConfigError) as e:
        load_file(str(path))
    assert e.value.problems == [(str(path), "No such file or directory")]


def test_load_file_unreadable(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_file(tmp_path)
    assert e.value.problems == [(str(tmp_path), "Is a directory")]
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'# caf\xe9\n')
    with pytest.raises(ConfigError) as e:
        load_file(path)
    assert e.value.problems == [(str(path), "not UTF-8 text (invalid continuation byte at byte 5)")]


def test_message():
    with pytest.raises(ConfigError) as e:
        load(doc(server=SERVER + "\nwieght = 2\nport = 0", extra="[x]"))
    assert str(e.value) == ("x: unknown section; servers.was1.wieght: unknown key; "
                            "servers.was1.port: port 0 is out of range 1-65535")


# --- broken configs ----------------------------------------------------------

SERVER = 'address = "10.1.11.101"'          # the port comes from doc()
POOL = 'servers = ["was1"]'
FE = 'vip = "10.1.1.101"\nport = 80\npool = "web"'


def doc(monitors="", server=SERVER + "\nport = 8080", pool=POOL, frontend=FE, extra=""):
    """A valid config (one server was1, pool web, frontend www) but for what is given."""
    return "\n".join([monitors, "[servers.was1]", server, "[pools.web]", pool,
                      "[frontends.www]", frontend, extra])


def maglev_pools(*sizes):
    """Maglev pools m0, m1, ... of was1, with these maglev_size values (TOML text)."""
    return "\n".join(f'[pools.m{i}]\nservers = ["was1"]\nalgorithm = "maglev"\n'
                     f'maglev_size = {size}' for i, size in enumerate(sizes))


def monitor(*lines):
    return "\n".join(["[monitors.m]", *lines])


NONE_ONLY = 'only for type "tcp", "http", "https" or "udp" (type "none" never checks)'
HTTP_ONLY = 'only for type "http" or "https"'
BAD = [
    # TOML itself
    ("toml-syntax", '[servers.was1]\naddress = 10.1.11.101\n',
     [("toml", "Expected newline or end of document after a statement (at line 2, column 15)")]),
    ("toml-table-twice", doc(extra="[servers.was1]"),
     [("toml", "Cannot declare servers.was1 twice (at line 11, column 14)")]),
    # a name with a dot is spelt as the file must spell it: servers.was1.example.com
    # would be a table example.com in a table was1
    ("toml-dotted-name-twice", '[servers."was1.example.com"]\n[servers."was1.example.com"]',
     [("toml", 'Cannot declare servers."was1.example.com" twice (at line 2, column 28)')]),
    ("dotted-names", doc(server=SERVER + "\nport = 8080", extra='[servers."was2.example.com"]\n'
                         'address = "10.1.11.102"\nport = 80\nweight = 2\n'
                         '[pools."web.v2"]\nservers = ["was2.example.com"]\n'
                         '[frontends."www.v2"]\nvip = "10.1.1.101"\nport = 80\n'
                         'pool = "web.v2"'),
     [('frontends."www.v2"', "duplicate of frontends.www (10.1.1.101:80/tcp)"),
      ('servers."was2.example.com".weight', '2, but its pools are roundrobin (pools."web.v2"), '
       'which gives every server the same share: algorithm = "weighted" honours weights')]),
    # Python reads no integer of more than 4300 digits (sys.get_int_max_str_digits)
    ("toml-integer-too-long", doc(server=SERVER + "\nport = " + "9" * 4301),
     [("toml", "an integer of more than 4300 digits (at line 4)")]),
    # sections and objects
    ("unknown-section", doc(extra='[server.was2]\naddress = "10.1.11.102"'),
     [("server", "unknown section")]),
    ("unknown-top-level-key", 'version = 2\n' + doc(),
     [("version", "unknown section")]),
    ("section-not-a-table", doc(extra="[[pools]]\nservers = []").replace("[pools.web]\n" + POOL, ""),
     [("pools", "expected a table, got array")]),
    ("object-not-a-table", doc(monitors='[monitors]\nm = "tcp"', server=SERVER + "\nport = 8080"
                                                                        '\nmonitor = "m"'),
     [("monitors.m", "expected a table, got string")]),
    ("unknown-key", doc(server=SERVER + "\nport = 8080\nwieght = 2"),
     [("servers.was1.wieght", "unknown key")]),
    ("unknown-subtable", doc(extra="[frontends.www.tls]\ncert = 'x'"),
     [("frontends.www.tls", "unknown key")]),
    ("bad-names", doc(extra='[monitors."-m"]\n[monitors."a b"]\n[monitors."é"]\n[monitors.""]'),
     [("monitors.-m", "bad name: use letters, digits, '_', '.' and '-', starting with a letter "
                      "or digit"),
      ('monitors."a b"', "bad name: use letters, digits, '_', '.' and '-', starting with a letter "
                       "or digit"),
      ('monitors."é"', "bad name: use letters, digits, '_', '.' and '-', starting with a letter "
                     "or digit"),
      ('monitors.""', "bad name: use letters, digits, '_', '.' and '-', starting with a letter "
                    "or digit")]),
    ("bad-name-still-checked", doc(extra='[pools."_p"]\nservers = ["was9"]'),
     [("pools._p", "bad name: use letters, digits, '_', '.' and '-', starting with a letter "
                   "or digit"),
      ("pools._p.servers[0]", "no server 'was9'")]),
    # types
    ("int-is-a-string", doc(server=SERVER + '\nport = "8080"'),
     [("servers.was1.port", "expected an integer, got string")]),
    ("int-is-a-bool", doc(server=SERVER + "\nport = true"),
     [("servers.was1.port", "expected an integer, got boolean")]),
    ("int-is-a-float", doc(server=SERVER + "\nport = 8080.0\nweight = 1.0"),
     [("servers.was1.port", "expected an integer, got float"),
      ("servers.was1.weight", "expected an integer, got float")]),
    ("int-is-a-date", doc(server=SERVER + "\nport = 1979-05-27"),
     [("servers.was1.port", "expected an integer, got date")]),
    ("bool-types", doc(server=SERVER + '\nport = 8080\nbackup = "yes"\nenabled = 1'),
     [("servers.was1.backup", "expected a boolean, got string"),
      ("servers.was1.enabled", "expected a boolean, got integer")]),
    ("number-types", doc(monitor("interval = '2s'", "timeout = true", "rise = [1]")),
     [("monitors.m.interval", "expected a number, got string"),
      ("monitors.m.timeout", "expected a number, got boolean"),
      ("monitors.m.rise", "expected an integer, got array")]),
    ("string-types", doc(monitor('type = 1', 'path = {}', 'host = 2024-01-01T00:00:00'),
                         server="address = 10\nport = 8080"),
     [("monitors.m.type", "expected a string, got integer"),
      ("monitors.m.path", "expected a string, got table"),
      ("monitors.m.host", "expected a string, got datetime"),
      ("servers.was1.address", "expected a string, got integer")]),
    # required keys
    ("required", doc(server="weight = 2", pool='algorithm = "weighted"', frontend=""),
     [("servers.was1.address", "required"), ("servers.was1.port", "required"),
      ("pools.web.servers", "required"),
      ("frontends.www.vip", "required"), ("frontends.www.port", "required"),
      ("frontends.www.pool", "required")]),
    # values
    ("bad-addresses", doc(server='address = "10.1.11.300"\nport = 8080',
                          frontend=FE.replace("10.1.1.101", "::1")),
     [("servers.was1.address", "'10.1.11.300' is not an IPv4 address"),
      ("frontends.www.vip", "'::1' is not an IPv4 address")]),
    ("addresses-no-host-has", doc(server='address = "0.0.0.0"\nport = 8080',
                                  frontend=FE.replace("10.1.1.101", "224.1.1.1")),
     [("servers.was1.address", "'0.0.0.0' is an unspecified address, not a host's"),
      ("frontends.www.vip", "'224.1.1.1' is a multicast address, not a host's")]),
    ("ports-out-of-range", doc(monitor("port = 70000"), server=SERVER + "\nport = 0",
                               frontend=FE.replace("80", "65536")),
     [("monitors.m.port", "port 70000 is out of range 1-65535"),
      ("servers.was1.port", "port 0 is out of range 1-65535"),
      ("frontends.www.port", "port 65536 is out of range 1-65535")]),
    ("monitor-port-not-a-port", doc(monitor("port = 0")) + '\n[monitors.n]\nport = "x"',
     [("monitors.m.port", "port 0 is out of range 1-65535"),
      ("monitors.n.port", "expected an integer, got string")]),
    ("weights-out-of-range", doc(server=SERVER + "\nport = 8080\nweight = 0",
                                 extra='[servers.was2]\naddress = "10.1.11.102"\nport = 1\n'
                                       'weight = 257'),
     [("servers.was1.weight", "weight 0 is out of range 1-256"),
      ("servers.was2.weight", "weight 257 is out of range 1-256")]),
    ("rise-fall", doc(monitor("rise = 0", "fall = -1")),
     [("monitors.m.rise", "must be at least 1, got 0"),
      ("monitors.m.fall", "must be at least 1, got -1")]),
    ("interval-timeout-not-positive", doc(monitor("interval = 0", "timeout = -0.5")),
     [("monitors.m.interval", "must be a positive number of seconds, got 0"),
      ("monitors.m.timeout", "must be a positive number of seconds, got -0.5")]),
    ("monitor-below-bounds", doc(monitor("interval = 1e-300", "timeout = 0.009")),
     [("monitors.m.interval", "must be at least 0.01 seconds, got 1e-300"),
      ("monitors.m.timeout", "must be at least 0.01 seconds, got 0.009")]),
    ("monitor-beyond-bounds", doc(monitor("interval = 86401", "timeout = 1e300",
                                          "rise = 1001", "fall = 99999999999999999")),
     [("monitors.m.interval", "must be at most 86400 seconds (a day), got 86401"),
      ("monitors.m.timeout", "must be at most 86400 seconds (a day), got 1e+300"),
      ("monitors.m.rise", "must be at most 1000, got 1001"),
      ("monitors.m.fall", "must be at most 1000, got 99999999999999999")]),
    ("http-check-not-ascii", doc(monitor('type = "http"', 'path = "/\u5065"',
                                         'host = "\u4f8b.jp"')),
     [("monitors.m.path", "'/\u5065' is not ASCII: percent-encode it"),
      ("monitors.m.host", "'\u4f8b.jp' is not ASCII: give an internationalized name in its "
                          "xn-- form")]),
    ("one-server-twice-in-a-pool", doc(pool='servers = ["was1", "twin"]',
                                       extra='[servers.twin]\naddress = "10.1.11.101"\n'
                                             'port = 8080'),
     [("pools.web.servers[1]", "'twin' is 10.1.11.101:8080, as 'was1': one server twice")]),
    ("weights-in-a-roundrobin-pool", doc(server=SERVER + "\nport = 8080\nweight = 3",
                                         pool='servers = ["was1", "was2"]',
                                         extra='[servers.was2]\naddress = "10.1.11.102"\n'
                                               'port = 8080\nweight = 2\n[pools.w]\n'
                                               'servers = ["was1"]\n[pools.x]\n'
                                               'servers = ["was2"]\nalgorithm = "weighted"'),
     [("servers.was1.weight", "3, but its pools are roundrobin (pools.web), which gives "
                              "every server the same share: algorithm = \"weighted\" honours "
                              "weights")]),
    ("interval-wrong-timeout-left-out", doc(monitor("interval = '2s'")),
     [("monitors.m.interval", "expected a number, got string")]),
    ("interval-not-finite", doc(monitor("interval = inf", "timeout = nan")),
     [("monitors.m.interval", "must be a positive number of seconds, got inf"),
      ("monitors.m.timeout", "must be a positive number of seconds, got nan")]),
    ("timeout-over-interval", doc(monitor("interval = 2", "timeout = 3")),
     [("monitors.m.timeout", "3.0 is longer than the interval 2.0")]),
    ("http-only-keys", doc(monitor('path = "/"', 'expect_status = 200', 'expect_body = "x"',
                                   'host = "h"'))
     + '\n[monitors.n]\ntype = "none"\npath = "/"',
     [("monitors.m.path", HTTP_ONLY),
      ("monitors.m.expect_status", HTTP_ONLY),
      ("monitors.m.expect_body", HTTP_ONLY),
      ("monitors.m.host", HTTP_ONLY),
      ("monitors.n.path", HTTP_ONLY)]),
    ("none-monitor-check-settings", doc(monitor('type = "none"', "port = 8080", "interval = 5",
                                                "timeout = 1", "rise = 3", "fall = 4",
                                                'path = "/health"')),
     [("monitors.m.port", NONE_ONLY), ("monitors.m.interval", NONE_ONLY),
      ("monitors.m.timeout", NONE_ONLY), ("monitors.m.rise", NONE_ONLY),
      ("monitors.m.fall", NONE_ONLY), ("monitors.m.path", HTTP_ONLY)]),
    ("http-values", doc(monitor('type = "http"', 'path = "health"', 'expect_status = 600',
                                'expect_body = ""', 'host = "a b"'))
     + '\n[monitors.n]\ntype = "http"\npath = "/a\\r\\nX: y"\nexpect_status = 99',
     [("monitors.m.path", "must start with '/', got 'health'"),
      ("monitors.m.expect_status", "status 600 is out of range 100-599"),
      ("monitors.m.expect_body", "must not be empty (leave the key out instead)"),
      ("monitors.m.host", "'a b' contains whitespace or control characters"),
      ("monitors.n.path", "'/a\\r\\nX: y' contains whitespace or control characters"),
      ("monitors.n.expect_status", "status 99 is out of range 100-599")]),
    # what a server would answer with 400 or 414, keeping its server down
    ("http-request-a-server-refuses",
     doc(monitor('type = "http"', 'path = "/x?y=1#top"', 'host = "a/b"'))
     + '\n[monitors.n]\ntype = "http"\npath = "/%zz"\nhost = "h:99999"'
     + f'\n[monitors.o]\ntype = "http"\npath = "/{"a" * 4096}"\nhost = "{"h" * 254}"'
     + '\n[monitors.p]\ntype = "http"\nhost = "h:65536"'
     + '\n[monitors.ok]\ntype = "http"\npath = "/a%20b?c=%2F"\nhost = "[::1]:8080"'
     + '\n[monitors.ok2]\ntype = "http"\nhost = "xn--caf-dma.example:443"',
     [("monitors.m.path", "'/x?y=1#top' has a fragment ('#'), which a request does not carry"),
      ("monitors.m.host", "'a/b' is not a host name, IPv4 address or [IPv6] address, with an "
                          "optional :port (1-65535)"),
      ("monitors.n.path", "'/%zz' has a '%' not followed by two hex digits: write '%' as %25"),
      ("monitors.n.host", "'h:99999' is not a host name, IPv4 address or [IPv6] address, with "
                          "an optional :port (1-65535)"),
      ("monitors.o.path", "4097 bytes: at most 4096"),
      ("monitors.o.host", f"'{'h' * 60}'... (254 characters) is not a host name, IPv4 "
                          "address or [IPv6] address, with an optional :port (1-65535)"),
      ("monitors.p.host", "'h:65536' is not a host name, IPv4 address or [IPv6] address, with "
                          "an optional :port (1-65535)")]),
    # nginx answers 400 to a path that climbs above the root or holds a NUL; a `..`
    # that stays under it, and a %00 in the query, it takes
    ("http-path-a-server-refuses",
     doc(monitor('type = "http"', 'path = "/a/../../x"'))
     + '\n[monitors.n]\ntype = "https"\npath = "/%2e%2E/x"'
     + '\n[monitors.o]\ntype = "http"\npath = "/a%00b"'
     + '\n[monitors.ok]\ntype = "http"\npath = "/a/../x/./y/.."'
     + '\n[monitors.ok2]\ntype = "http"\npath = "//x?q=%00&r=/../.."',
     [("monitors.m.path", "'/a/../../x' climbs above the root ('..'), which servers refuse"),
      ("monitors.n.path", "'/%2e%2E/x' climbs above the root ('..'), which servers refuse"),
      ("monitors.o.path", "'/a%00b' has a NUL (%00) before its query, which servers refuse")]),
    # nginx answers 400 (and Apache) to a name with an empty label; a trailing dot is a
    # fully qualified name, and a leading one it takes
    ("http-host-with-an-empty-label",
     doc(monitor('type = "http"', 'host = "www..example.com"'))
     + '\n[monitors.n]\ntype = "https"\nhost = ".:8443"'
     + '\n[monitors.ok]\ntype = "http"\nhost = "www.example.com.:8080"'
     + '\n[monitors.ok2]\ntype = "http"\nhost = ".example.com"',
     [("monitors.m.host", "'www..example.com' is not a host name: it has an empty label (two "
                          "dots in a row, or a lone dot), which servers refuse"),
      ("monitors.n.host", "'.:8443' is not a host name: it has an empty label (two dots in a "
                          "row, or a lone dot), which servers refuse")]),
    ("body-longer-than-a-check-reads",
     doc(monitor('type = "http"', f'expect_body = "{"é" * 32769}"')),
     [("monitors.m.expect_body", "65538 bytes: a check reads 65536 bytes of the body, so it "
                                 "would never find it")]),
    ("udp-monitor-keys", doc(monitor('type = "udp"', 'expect_hex = "1c0"', 'path = "/"',
                                     'expect_body = "x"') +
                             "\n[monitors.n]\nsend_hex = \"1b\"\nexpect_hex = \"1c\"\n"
                             "[monitors.o]\ntype = \"none\"\nsend_hex = \"1b\"\n"
                             "[monitors.p]\ntype = \"udp\"\nsend_hex = \"1b zz\"\n"
                             "[monitors.q]\ntype = \"udp\"\nsend_hex = 27\nexpect_hex = \" \"\n"
                             f"[monitors.r]\ntype = \"udp\"\nsend_hex = \"{'00' * 65508}\"\n"),
     [("monitors.m.expect_hex", "3 hex digits, an odd number: two make a byte"),
      ("monitors.m.path", HTTP_ONLY),
      ("monitors.m.expect_body", HTTP_ONLY),
      ("monitors.m.send_hex", "required"),
      ("monitors.n.send_hex", 'only for type "udp"'),
      ("monitors.n.expect_hex", 'only for type "udp"'),
      ("monitors.o.send_hex", 'only for type "udp"'),
      ("monitors.p.send_hex", "'z' is not a hex digit (0-9, a-f; whitespace is ignored)"),
      ("monitors.q.send_hex", "expected a string, got integer"),
      ("monitors.q.expect_hex", "no bytes: give them as hex digits, such as 1b00"),
      ("monitors.r.send_hex", "65508 bytes: a UDP datagram carries at most 65507")]),
    ("bad-choices", doc(monitor('type = "ftp"', 'path = "/"'),
                        pool=POOL + '\nalgorithm = "rr"\non_server_down = "drop"',
                        frontend=FE + '\nprotocol = "SCTP"'),
     [("monitors.m.type", "expected tcp, http, https, udp or none, got 'ftp'"),
      ("pools.web.algorithm", "expected roundrobin, weighted, maglev or source, got 'rr'"),
      ("pools.web.on_server_down", "expected keep or reset, got 'drop'"),
      ("frontends.www.protocol", "protocol 'SCTP' is not tcp or udp")]),
    # pools
    ("pool-without-servers", doc(pool="servers = []"),
     [("pools.web.servers", "a pool needs at least one server")]),
    ("pool-servers-not-an-array", doc(pool='servers = "was1"'),
     [("pools.web.servers", "expected an array, got string")]),
    ("pool-server-twice", doc(pool='servers = ["was1", 1, "was1"]'),
     [("pools.web.servers[1]", "expected a string, got integer"),
      ("pools.web.servers[2]", "'was1' is listed twice")]),
    # references
    ("dangling-references", doc(monitor('type = "tcp"'), server=SERVER + '\nport = 8080\n'
                                'monitor = "n"', pool='servers = ["was1", "was3"]\nmonitor = "x"',
                                frontend=FE.replace('"web"', '"webb"')),
     [("servers.was1.monitor", "no monitor 'n'"),
      ("pools.web.servers[1]", "no server 'was3'"),
      ("pools.web.monitor", "no monitor 'x'"),
      ("frontends.www.pool", "no pool 'webb'")]),
    ("no-monitors-section", doc(pool=POOL + '\nmonitor = "m"'),
     [("pools.web.monitor", "no monitor 'm'")]),
    ("reference-to-a-bad-object-is-not-dangling", doc(server=SERVER + '\nport = "x"'),
     [("servers.was1.port", "expected an integer, got string")]),
    # frontends
    ("duplicate-service", doc(extra="[frontends.b]\n" + FE.replace("pool", "protocol = 'tcp'\npool")
                              + "\n[frontends.c]\n" + FE),
     [("frontends.b", "duplicate of frontends.www (10.1.1.101:80/tcp)"),
      ("frontends.c", "duplicate of frontends.www (10.1.1.101:80/tcp)")]),
    ("server-at-a-vip", doc(server='address = "10.1.1.102"\nport = 8080',
                            extra='[frontends.other]\nvip = "10.1.1.102"\nport = 443\n'
                                  'pool = "web"'),
     [("servers.was1.address", "10.1.1.102 is the VIP of frontends.other")]),
    ("no-frontends", doc(frontend="").replace("[frontends.www]", ""),
     [("frontends", "at least one frontend is required")]),
    ("empty-frontends-table", doc(frontend="").replace("[frontends.www]", "[frontends]"),
     [("frontends", "at least one frontend is required")]),
    ("interfaces", doc(frontend=FE + '\ninterfaces = ["eth0", "", "veth/1", "a b", '
                                     '"abcdefghijklmnop", 1, "eth0", "abcdefghijklmno", '
                                     '"..", "eth0:1"]'),
     [("frontends.www.interfaces[1]", "an interface name cannot be empty"),
      ("frontends.www.interfaces[2]", f"'veth/1' {NOT_IFNAME}"),
      ("frontends.www.interfaces[3]", f"'a b' {NOT_IFNAME}"),
      ("frontends.www.interfaces[4]", "'abcdefghijklmnop' is longer than 15 bytes"),
      ("frontends.www.interfaces[5]", "expected a string, got integer"),
      ("frontends.www.interfaces[6]", "'eth0' is listed twice"),
      ("frontends.www.interfaces[8]", f"'..' {NOT_IFNAME}"),
      ("frontends.www.interfaces[9]", f"'eth0:1' {NOT_IFNAME}")]),
    ("interfaces-not-an-array", doc(frontend=FE + '\ninterfaces = "eth0"'),
     [("frontends.www.interfaces", "expected an array, got string")]),
    ("timeouts", doc(frontend=FE + '\ntimeout_syn = 0\ntimeout_established = 604801\n'
                                   'timeout_closing = 1.5',
                     extra=DNS + 'timeout_udp = "300"'),
     [("frontends.www.timeout_syn", "timeout 0 is out of range 1-604800 seconds"),
      ("frontends.www.timeout_established", "timeout 604801 is out of range 1-604800 seconds"),
      ("frontends.www.timeout_closing", "expected an integer, got float"),
      ("frontends.dns.timeout_udp", "expected an integer, got string")]),
    # the other protocol's timeouts are warned of (test above), but read as timeouts
    ("timeouts-of-the-other-protocol",
     doc(frontend=FE + "\ntimeout_udp = 0",
         extra=DNS + 'timeout_syn = "5"\n'
               + '[frontends.x]\nvip = "10.1.1.102"\nport = 1\nprotocol = "sctp"\n'
                 'pool = "web"\ntimeout_udp = 9\ntimeout_syn = 5'),
     [("frontends.www.timeout_udp", "timeout 0 is out of range 1-604800 seconds"),
      ("frontends.dns.timeout_syn", "expected an integer, got string"),
      ("frontends.x.protocol", "protocol 'sctp' is not tcp or udp")]),
    # Maglev pools
    ("maglev-size-values", doc(pool=POOL + '\nalgorithm = "maglev"\nmaglev_size = 65536',
                               extra=maglev_pools(65539, 0, '"big"', 1.0)),
     [("pools.web.maglev_size", "must be a prime, got 65536 (65521 and 65537 are)"),
      ("pools.m0.maglev_size", "65539 is larger than the data plane's tables (65537)"),
      ("pools.m1.maglev_size", "must be a prime, got 0"),
      ("pools.m2.maglev_size", "expected an integer, got string"),
      ("pools.m3.maglev_size", "expected an integer, got float")]),
    ("maglev-size-too-small", doc(pool='servers = ["was1", "was2"]\nalgorithm = "maglev"\n'
                                       'maglev_size = 101',
                                  extra='[servers.was2]\naddress = "10.1.11.102"\nport = 1'),
     [("pools.web.maglev_size", "101 slots are too few for 2 servers: 100 per server needs a "
                                "prime of at least 200, such as 211")]),
    ("maglev-size-too-small-for-source",
     doc(pool='servers = ["was1", "was2"]\nalgorithm = "source"\nmaglev_size = 101',
         extra='[servers.was2]\naddress = "10.1.11.102"\nport = 1'),
     [("pools.web.maglev_size", "101 slots are too few for 2 servers: 100 per server needs a "
                                "prime of at least 200, such as 211")]),
    ("maglev-size-only-for-maglev", doc(pool=POOL + '\nmaglev_size = 65537',
                                        extra='[pools.w]\nservers = ["was1"]\n'
                                              'algorithm = "weighted"\nmaglev_size = 4'),
     [("pools.web.maglev_size", 'only for algorithm "maglev" or "source"'),
      ("pools.w.maglev_size", 'only for algorithm "maglev" or "source"')]),
    ("maglev-too-many-servers", doc(pool='algorithm = "maglev"\nservers = '
                                         + str([f"s{i}" for i in range(656)]).replace("'", '"'),
                                    extra="".join(f'[servers.s{i}]\naddress = "10.2.{i // 250}.'
                                                  f'{i % 250 + 1}"\nport = 80\n'
                                                  for i in range(656))),
     [("pools.web.servers", "656 servers are too many for a Maglev pool: at most 655 "
                            "(100 slots each in 65537)")]),
    ("adopt-replies-not-maglev", doc(frontend=FE + "\nadopt_replies = true"),
     [("frontends.www.adopt_replies", 'needs a pool with algorithm "maglev" or "source" '
                                      '(pools.web is "roundrobin"): every node must send a '
                                      'client to the same server')]),
    ("adopt-replies-shared-server",
     doc(pool=POOL + '\nalgorithm = "maglev"', frontend=FE + "\nadopt_replies = true",
         extra='[frontends.www2]\nvip = "10.1.1.102"\nport = 80\npool = "web"'),
     [("frontends.www.adopt_replies", "servers.was1 (10.1.11.101:8080/tcp) also serves "
                                      "frontends.www2: its packets could be either's replies")]),
    # a line a frontend, not one a server and frontend (millions with 655-server pools)
    ("adopt-replies-shared-pool",
     doc(pool='servers = ["was1", "s2", "s3"]\nalgorithm = "maglev"',
         frontend=FE + "\nadopt_replies = true",
         extra='[frontends.www2]\nvip = "10.1.1.102"\nport = 80\npool = "web"\n'
               'adopt_replies = true\n'
               '[servers.s2]\naddress = "10.1.11.102"\nport = 80\n'
               '[servers.s3]\naddress = "10.1.11.103"\nport = 80'),
     [("frontends.www.adopt_replies", "servers.was1 (10.1.11.101:8080/tcp) also serves "
                                      "frontends.www2: its packets could be either's replies; "
                                      "2 more of pools.web's servers serve another frontend too"),
      ("frontends.www2.adopt_replies", "servers.was1 (10.1.11.101:8080/tcp) also serves "
                                       "frontends.www: its packets could be either's replies; "
                                       "2 more of pools.web's servers serve another frontend "
                                       "too")]),
    ("adopt-replies-not-boolean", doc(frontend=FE + '\nadopt_replies = "yes"'),
     [("frontends.www.adopt_replies", "expected a boolean, got string")]),
    # everything at once, in order: unknown sections; then the sections in schema order, their
    # objects and keys in file order (an object's own checks after its keys'); then the
    # checks across frontends and servers
    ("several-problems", textwrap.dedent('''\
        [frontends.a]
        vip = "10.1.1.101"
        port = 80
        pool = "web"
        interfaces = [""]

        [frontends.b]
        vip = "10.1.1.101"
        port = 80
        pool = "nope"

        [pools.web]
        servers = ["was1", "was3", "was1"]
        algorithm = "rr"

        [servers.was1]
        address = "10.1.1.101"
        port = true
        wieght = 2

        [servers."bad name"]
        port = 1.5

        [monitors.m]
        type = "tcp"
        path = "/x"
        timeout = 5
        rise = 0

        [extra]
        '''),
     [("extra", "unknown section"),
      ("monitors.m.path", HTTP_ONLY),
      ("monitors.m.rise", "must be at least 1, got 0"),
      ("monitors.m.timeout", "5.0 is longer than the interval 2.0"),
      ("servers.was1.port", "expected an integer, got boolean"),
      ("servers.was1.wieght", "unknown key"),
      ('servers."bad name"', "bad name: use letters, digits, '_', '.' and '-', starting with a "
                           "letter or digit"),
      ('servers."bad name".port', "expected an integer, got float"),
      ('servers."bad name".address', "required"),
      ("pools.web.servers[1]", "no server 'was3'"),
      ("pools.web.servers[2]", "'was1' is listed twice"),
      ("pools.web.algorithm", "expected roundrobin, weighted, maglev or source, got 'rr'"),
      ("frontends.a.interfaces[0]", "an interface name cannot be empty"),
      ("frontends.b.pool", "no pool 'nope'"),
      ("frontends.b", "duplicate of frontends.a (10.1.1.101:80/tcp)"),
      ("servers.was1.address", "10.1.1.101 is the VIP of frontends.a")]),
]


def test_base_doc_is_valid():
    cfg = load(doc())
    assert [f.endpoint for f in cfg.frontends] == ["10.1.1.101:80/tcp"]


@pytest.mark.parametrize("lines,interval,timeout", [
    ((), 2.0, 1.0), (("interval = 0.5",), 0.5, 0.5), (("interval = 0.5", "timeout = 0.2"), 0.5, 0.2)])
def test_a_monitor_without_a_timeout_takes_one_second_or_its_interval_if_shorter(
        lines, interval, timeout):
    """As `xlb up --interval` does, and as HAProxy's check takes its `inter`."""
    (m,) = load(doc(monitor(*lines))).monitors
    assert (m.interval, m.timeout) == (interval, timeout)


@pytest.mark.parametrize("text,problems", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config(text, problems):
    with pytest.raises(ConfigError) as e:
        load(text)
    assert e.value.problems == problems


@pytest.mark.parametrize("line,taken", [
    ("expect_status = 100", (100, 0)), ("expect_status = 599", (599, 0)),
    (f'expect_body = "{"é" * 32768}"', (None, 65536)),   # what a check reads of a body
], ids=["status-100", "status-599", "body-65536-bytes"])
def test_an_http_check_at_the_bounds_is_taken(line, taken):
    """BAD has the values just past each bound: these are the bounds."""
    (m,) = load(doc(monitor('type = "http"', line), pool=POOL + '\nmonitor = "m"')).monitors
    assert (m.expect_status, len((m.expect_body or "").encode())) == taken


def servers_and_pool(n, algorithm="roundrobin", pool="p"):
    """TOML for servers s0..s(n-1) and a pool of them."""
    servers = "".join(f'[servers.s{i}]\naddress = "10.2.{i // 250}.{i % 250 + 1}"\nport = 80\n'
                      for i in range(n))
    members = ", ".join(f'"s{i}"' for i in range(n))
    return servers + f'[pools.{pool}]\nservers = [{members}]\nalgorithm = "{algorithm}"\n'


def frontends(n, pool, first=0):
    return "".join(f'[frontends.f{i}]\nvip = "10.1.{i // 250}.{i % 250 + 1}"\nport = 80\n'
                   f'pool = "{pool}"\n' for i in range(first, first + n))


@pytest.mark.parametrize("text,problem", [
    (servers_and_pool(1) + frontends(257, "p"),
     ("frontends", "257 frontends: the data plane holds 256")),
    (servers_and_pool(1, "maglev") + frontends(17, "p"),
     ("frontends", "17 frontends with a Maglev pool: the data plane holds 16")),
    # source pools hold Maglev tables too, counted with maglev's
    (servers_and_pool(1, "source") + '[pools.q]\nservers = ["s0"]\nalgorithm = "maglev"\n'
     + frontends(9, "p") + frontends(8, "q", first=9),
     ("frontends", "17 frontends with a Maglev pool: the data plane holds 16")),
    (servers_and_pool(656, "source") + frontends(1, "p"),
     ("pools.p.servers", "656 servers are too many for a Maglev pool: at most 655 "
                         "(100 slots each in 65537)")),
    (servers_and_pool(1025) + frontends(1, "p"),
     ("pools.p.servers", "1025 servers do not fit a ring of 1024")),
    (servers_and_pool(600, "maglev") + "".join(
        f'[pools.q{k}]\nservers = [{", ".join(f"{chr(34)}s{i}{chr(34)}" for i in range(600))}]\n'
        f'algorithm = "maglev"\n' for k in range(27)) + frontends(1, "p"),
     ("pools", "16800 servers in pools (one counts once in each of its pools): the data "
               "plane holds 16384")),
    # the links xlb runs on (tx_links): the 1,025th attach failed, after the others
    (servers_and_pool(1) + frontends(1, "p")
     + "interfaces = [" + ", ".join(f'"v{i}"' for i in range(1025)) + "]\n",
     ("frontends", "1025 interfaces: the data plane holds 1024")),
])
def test_a_config_larger_than_the_data_plane_holds_fails_check(text, problem):
    """As `xlb up` and `apply` would find it (planner.CapacityError), at once."""
    with pytest.raises(ConfigError) as e:
        load(text)
    assert e.value.problems == [problem]


def test_what_the_data_plane_holds_passes():
    load(servers_and_pool(1024) + frontends(256, "p"))
    members = ", ".join(f'"s{i}"' for i in range(1024))       # 16 pools of them: 16,384
    load(servers_and_pool(1024) + "".join(f"[pools.q{k}]\nservers = [{members}]\n"
                                          for k in range(15)) + frontends(1, "p"))
    load(servers_and_pool(655, "source") + frontends(16, "p"))
    load(servers_and_pool(1) + frontends(1, "p")
         + "interfaces = [" + ", ".join(f'"v{i}"' for i in range(1024)) + "]\n")


def test_frontends_sharing_a_pool_cost_no_check_per_frontend_and_server(monkeypatch):
    """Thousands of frontends on a pool of a thousand servers (an invalid file
    under 2 MiB) took 15 s to refuse: the servers of a frontend's pool were
    looked at once for each frontend. Counted, not timed: the hashes of
    addresses grow with the servers and frontends, not with their product."""
    hashes = 0
    address_hash = IPv4Address.__hash__

    def counted(self):
        nonlocal hashes
        hashes += 1
        return address_hash(self)

    text = (servers_and_pool(200, "maglev") + "[frontends.a]\nadopt_replies = true\n"
            'vip = "10.3.0.1"\nport = 80\npool = "p"\n' + frontends(300, "p"))
    monkeypatch.setattr(IPv4Address, "__hash__", counted)
    with pytest.raises(ConfigError):
        load(text)
    assert hashes < 10 * (200 + 300)
    # every one of them adopting replies, each told of the shared servers once
    hashes = 0
    with pytest.raises(ConfigError) as e:
        load(servers_and_pool(200, "maglev")
             + frontends(301, "p").replace('pool = "p"\n', 'pool = "p"\nadopt_replies = true\n'))
    assert hashes < 10 * (200 + 300)
    assert len(e.value.problems) == 2 + 301    # the capacity's two, and a line a frontend
    # the other frontend named is the first in the file that serves the server
    text = servers_and_pool(2, "maglev") + textwrap.dedent('''
        [pools.q]
        servers = ["s0"]
        [frontends.a]
        vip = "10.1.0.1"
        port = 80
        pool = "p"
        adopt_replies = true
        [frontends.b]
        vip = "10.1.0.2"
        port = 80
        pool = "q"
        [frontends.c]
        vip = "10.1.0.3"
        port = 80
        pool = "p"
        ''')
    with pytest.raises(ConfigError) as e:
        load(text)
    shared = "servers.s0 (10.2.0.1:80/tcp) also serves frontends.b: its packets could be " \
             "either's replies; 1 more of pools.p's servers serves another frontend too"
    assert [reason for _, reason in e.value.problems] == [shared]
    # a pool that lists a server twice (under two names) counts it all the same
    with pytest.raises(ConfigError) as e:
        load(text.replace('[servers.s1]\naddress = "10.2.0.2"', '[servers.s1]\naddress = "10.2.0.1"'))
    assert [reason for _, reason in e.value.problems][1:] == [shared]


def test_nesting_too_deep_is_one_problem():
    with pytest.raises(ConfigError) as e:
        load("a = " + "[" * 1000 + "]" * 1000)
    assert e.value.problems == [("toml", "arrays or tables nested too deeply")]


def test_nesting_is_refused_within_a_worker_thread_s_stack():
    """The instance reads a file in a worker thread (asyncio.to_thread), and
    tomli's compiled parser recurses on the C stack, where a file nested too
    deep ends the process: tomli 2.5 refuses past 400 levels, which 1 MiB of
    stack holds (2.4.1, up to 1,000, crashed there). In a process of its own,
    so that a crash fails this test, not the run."""
    code = textwrap.dedent("""
        import threading
        from xlb.config import load
        from xlb.model import ConfigError

        def read():
            for depth in (399, 1000):
                try:
                    load("a = " + "{b = " * depth + "1" + "}" * depth)
                except ConfigError as e:
                    print(e.problems[0][1])

        threading.stack_size(1 << 20)
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "unknown section\narrays or tables nested too deeply\n")


def test_the_file_is_toml_1_1():
    """README: TOML 1.1, as tomli reads it: an inline table over several lines,
    with a trailing comma (which TOML 1.0, the standard library's tomllib, refuses)."""
    spread = 'servers.was1 = {\n    address = "10.1.11.101",\n    port = 8080,\n}'
    assert load(doc().replace("[servers.was1]\n" + SERVER + "\nport = 8080", spread)) \
        == load(doc())


def test_read_takes_regular_files_of_at_most_max_file_bytes(tmp_path):
    import os
    from xlb.config import MAX_FILE, read
    assert MAX_FILE == 8 * 2**20        # the README's "over 8 MiB"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                         # no writer: reading it would wait for ever
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * MAX_FILE + b"\n")
    for path, problem in ((fifo, "not a regular file"), (tmp_path, "Is a directory"),
                          (big, f"larger than {MAX_FILE} bytes")):
        with pytest.raises(ConfigError) as e:
            read(path)
        assert e.value.problems == [(str(path), problem)]
    big.write_bytes(b"#" * (MAX_FILE - 1) + b"\n")
    assert len(read(big)) == MAX_FILE


def test_a_config_of_as_many_servers_as_the_data_plane_holds_is_read_with_long_names(tmp_path):
    """16,384 servers (the data plane's most), named as a generator names
    them (some 40 characters): the file, some 2.5 MiB, was refused as larger
    than the 2 MiB a config could be."""
    from xlb.config import read
    out = []
    for p in range(16):
        names = [f"web-prod-eu-west-1a-rack{p:02d}-node{i:05d}-svc" for i in range(1024)]
        out += [f'[servers.{name}]\naddress = "10.{p}.{i // 250}.{i % 250 + 1}"\nport = 8080\n'
                for i, name in enumerate(names)]
        out.append(f'[pools.p{p}]\nservers = {json.dumps(names)}\n')
        out.append(f'[frontends.f{p}]\nvip = "10.200.{p}.1"\nport = 80\npool = "p{p}"\n')
    path = tmp_path / "big.toml"
    path.write_text("\n".join(out))
    assert path.stat().st_size > 2 << 20
    assert load(read(path)).server_count() == 16384


def test_a_read_that_fails_after_the_open_is_named_by_the_file():
    """As a disk's or a network file system's EIO would: /proc/self/mem is a
    regular file that opens, and its first page cannot be read."""
    from xlb.config import read
    with pytest.raises(ConfigError) as e:
        read("/proc/self/mem")
    assert e.value.problems == [("/proc/self/mem", "Input/output error")]


def test_read_opens_no_file_that_is_not_regular(tmp_path):
    """Opening can act: a tape rewinds, a watchdog starts its count down, a
    FIFO lets its waiting writer through (which this test sees)."""
    import os
    import threading
    from xlb.config import read
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    let_through, tid = threading.Event(), []

    def writer():
        tid.append(threading.get_native_id())
        os.close(os.open(fifo, os.O_WRONLY))    # waits for a reader
        let_through.set()

    waiting = threading.Thread(target=writer, daemon=True)
    waiting.start()
    while not (tid and Path(f"/proc/self/task/{tid[0]}/wchan").read_text()
               == "wait_for_partner"):          # the writer waits in its open
        let_through.wait(0.01)
    with pytest.raises(ConfigError) as e:
        read(fifo)
    assert e.value.problems == [(str(fifo), "not a regular file")]
    opened = let_through.wait(1.0)              # a writer let through goes on at once
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))     # the writer's reader, at last
    waiting.join()
    assert not opened


def test_a_byte_order_mark_is_no_part_of_the_config(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + SEED.read_bytes())
    assert load_file(path) == load_file(SEED)


def weighted_pool(*weights: int) -> str:
    """A config of one weighted pool, of servers s0, s1, ... of these weights."""
    servers = "".join(f'[servers.s{i}]\naddress = "10.2.{i // 250}.{i % 250 + 1}"\n'
                      f"port = 8080\nweight = {w}\n" for i, w in enumerate(weights))
    names = ", ".join(f'"s{i}"' for i in range(len(weights)))
    return (f'{servers}[pools.web]\nalgorithm = "weighted"\nservers = [{names}]\n'
            f'[frontends.www]\nvip = "10.1.1.101"\nport = 80\npool = "web"\n')


@pytest.mark.parametrize("weights, astray", [
    ([1] * 1000 + [256] * 20, "81%"),       # the README's: 2% of new flows, not 84%
    ([1] * 600 + [2] * 400, "17%"),
    ([10, 256] * 13, "1%"),                 # 1.2%: past 1%, if not by much
])
def test_a_weighted_pool_whose_ring_strays_from_its_weights_is_warned_of(weights, astray):
    assert load(weighted_pool(*weights)).warnings == ((
        "pools.web", f"its weights need more than a weighted ring's 1,024 slots: scaled down "
                     f"to fit, they send {astray} of new flows to other servers than they ask "
                     f'for (algorithm = "maglev", up to 655 servers, honours them within 1%)'),)


@pytest.mark.parametrize("weights", [
    [3, 1, 1],                              # fits the ring
    [256, 128] * 10,                        # fits, divided by the gcd
    [255, 256] * 5,                         # scaled down, a fraction of 1% astray
])
def test_a_weighted_pool_that_keeps_to_its_weights_is_not_warned_of(weights):
    assert load(weighted_pool(*weights)).warnings == ()
