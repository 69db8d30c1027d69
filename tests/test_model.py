"""The one-line form's model and its validation: no kernel, no root."""

from ipaddress import IPv4Address

import pytest

from xlb.model import (MAGLEV_SERVERS_MAX, MAX_FRONTENDS, MAX_LINKS, MAX_MAGLEV_FRONTENDS,
                       RING_SIZE, Config, ConfigError, Monitor, Pool, Server, check_maglev_servers,
                       check_maglev_size, from_flags, monitor_from_flags, parse_address,
                       parse_port, parse_vip)

B = ["10.1.11.101:8080", "10.1.11.102:8080"]


def test_seed_one_line_form():
    cfg = from_flags(["10.1.1.101:80"], B)
    (fe,) = cfg.frontends
    assert (fe.vip, fe.port, fe.protocol, fe.pool) == (IPv4Address("10.1.1.101"), 80, "tcp", "default")
    (pool,) = cfg.pools
    assert [(s.address, s.port, s.weight) for s in pool.servers] == [
        (IPv4Address("10.1.11.101"), 8080, 1), (IPv4Address("10.1.11.102"), 8080, 1)]
    assert pool.algorithm == "roundrobin"


def test_parse_address_takes_what_ipaddress_takes():
    """parse_address reads a plain dotted quad itself (faster): it takes and
    refuses what IPv4Address does, each number at each place."""
    def outcome(parse, text):
        try:
            return parse(text)
        except ValueError:
            return None
    octets = [str(n) for n in range(1000)] + [
        "00", "01", "007", "0255", "", "+1", "-1", " 1", "1 ", "1\n", "\u0661", "\uff11",
        "0x1", "1_0", "²"]
    texts = [".".join(["10"] * i + [octet] + ["10"] * (3 - i)) for i in range(4) for octet in octets]
    texts += ["1.2.3", "1.2.3.4.5", "1..2.3", "\n1.2.3.4", "1.2.3.4/32", "", "1.2.3.4%eth0"]
    for text in texts:
        assert outcome(parse_address, text) == outcome(IPv4Address, text), repr(text)


def test_vips_share_the_backends():
    cfg = from_flags(["10.1.1.101:80", "10.1.1.101:80/udp", "10.1.1.102:443/TCP"], B)
    assert [f.endpoint for f in cfg.frontends] == [
        "10.1.1.101:80/tcp", "10.1.1.101:80/udp", "10.1.1.102:443/tcp"]
    assert {f.pool for f in cfg.frontends} == {"default"}


@pytest.mark.parametrize("text,expected", [
    ("1.2.3.4:1", (IPv4Address("1.2.3.4"), 1, "tcp")),
    ("1.2.3.4:65535/udp", (IPv4Address("1.2.3.4"), 65535, "udp")),
])
def test_parse_vip(text, expected):
    assert parse_vip(text) == expected


BAD = [
    (["10.1.1.300:80"], B, "--vip 10.1.1.300:80: '10.1.1.300' is not an IPv4 address"),
    (["10.1.1.101"], B, "--vip 10.1.1.101: '10.1.1.101' is not IP:PORT"),
    ([":80"], B, "--vip :80: ':80' is not IP:PORT"),
    (["10.1.1.101:0"], B, "--vip 10.1.1.101:0: port 0 is out of range 1-65535"),
    (["10.1.1.101:65536"], B, "--vip 10.1.1.101:65536: port 65536 is out of range 1-65535"),
    (["10.1.1.101:http"], B, "--vip 10.1.1.101:http: port 'http' is not a number"),
    (["10.1.1.101:-1"], B, "--vip 10.1.1.101:-1: port '-1' is not a number"),
    (["10.1.1.101:80/sctp"], B, "--vip 10.1.1.101:80/sctp: protocol 'sctp' is not tcp or udp"),
    (["::1:80"], B, "--vip ::1:80: '::1' is not an IPv4 address"),
    (["0.0.0.0:80"], B, "--vip 0.0.0.0:80: '0.0.0.0' is an unspecified address, not a host's"),
    (["127.0.0.5:80"], B, "--vip 127.0.0.5:80: '127.0.0.5' is a loopback address, not a host's"),
    (["224.0.0.1:80"], B, "--vip 224.0.0.1:80: '224.0.0.1' is a multicast address, not a host's"),
    (["255.255.255.255:80"], B,
     "--vip 255.255.255.255:80: '255.255.255.255' is a broadcast address, not a host's"),
    (["240.0.0.1:80"], B, "--vip 240.0.0.1:80: '240.0.0.1' is a reserved address, not a host's"),
    (["10.1.1.101:80"], ["127.0.0.1:8080"],
     "--backend 127.0.0.1:8080: '127.0.0.1' is a loopback address, not a host's"),
    (["10.1.1.101:80"], [], "--backend: at least one backend is required"),
    ([], B, "--vip: at least one VIP is required"),
    (["10.1.1.101:80"], ["10.1.11.101:8080", "10.1.11.101:8080"],
     "--backend 10.1.11.101:8080: given twice"),
    (["10.1.1.101:80", "10.1.1.101:80/tcp"], B, "--vip 10.1.1.101:80/tcp: given twice"),
    (["10.1.1.101:80"], ["10.1.1.101:8080"], "--backend 10.1.1.101:8080: a backend cannot be a VIP"),
    (["10.1.1.101:80"], ["10.1.11.101:99999"],
     "--backend 10.1.11.101:99999: port 99999 is out of range 1-65535"),
    # as TOML's `port = 080` and an address's "010.1.1.101": maybe a mistyped 8080
    (["10.1.1.101:080"], B, "--vip 10.1.1.101:080: port '080' has a leading zero"),
    (["10.1.1.101:00"], B, "--vip 10.1.1.101:00: port '00' has a leading zero"),
]


@pytest.mark.parametrize("vips,backends,message", BAD, ids=[b[2] for b in BAD])
def test_bad_flags(vips, backends, message):
    with pytest.raises(ConfigError) as e:
        from_flags(vips, backends)
    assert str(e.value) == message


def test_all_problems_are_listed_at_once():
    with pytest.raises(ConfigError) as e:
        from_flags(["1.2.3.4:0", "x:1"], ["1.2.3.999:1"])
    assert len(e.value.problems) == 3


def test_one_line_monitor_defaults():
    m = monitor_from_flags("tcp", None, 2.0, 2, 3)
    assert (m.type, m.port, m.interval, m.timeout, m.rise, m.fall) == ("tcp", None, 2.0, 1.0, 2, 3)
    cfg = from_flags(["10.1.1.101:80"], B, monitor=m)
    assert cfg.monitor_for(cfg.pools[0], cfg.pools[0].servers[0]) == m


def test_a_server_under_a_monitor_of_type_none_is_not_checked():
    """monitor_for: the server's own monitor, else its pool's; none for type
    "none", whichever names it (status says "not checked", no check runs)."""
    servers = [Server("a", IPv4Address("10.1.11.1"), 80),
               Server("b", IPv4Address("10.1.11.2"), 80, monitor="tcp"),
               Server("c", IPv4Address("10.1.11.3"), 80, monitor="off")]
    cfg = Config(frontends=(), monitors=(Monitor("off", type="none"), Monitor("tcp")),
                 pools=(Pool("p", tuple(servers[:2]), monitor="off"),
                        Pool("q", tuple(servers[2:]), monitor="tcp")))
    checked = {s.name: cfg.monitor_for(p, s) for p in cfg.pools for s in p.servers}
    assert {name: m and m.name for name, m in checked.items()} == {"a": None, "b": "tcp", "c": None}


def test_a_server_at_one_address_and_port_counts_once_whatever_its_names():
    """server_count, as check, apply and the start say it: the same server in
    two pools, under two names, is one server."""
    a = IPv4Address("10.1.11.1")
    cfg = Config(frontends=(), pools=(Pool("p", (Server("a", a, 80), Server("b", a, 81))),
                                      Pool("q", (Server("web-a", a, 80),))))
    assert cfg.server_count() == 2


def test_one_line_http_monitor_and_short_interval():
    m = monitor_from_flags("http:/health", "9000", 0.5, 1, 1)
    assert (m.type, m.path, m.port, m.timeout) == ("http", "/health", 9000, 0.5)
    assert monitor_from_flags("none", None, 2.0, 2, 3) is None


def test_one_line_https_monitor():
    """https:/PATH: http:/PATH's check over TLS, its path checked the same way."""
    m = monitor_from_flags("https:/health", "8443", 2.0, 2, 3)
    assert (m.type, m.path, m.port, m.expect_status) == ("https", "/health", 8443, None)
    for kind, problem in [("https:health", "'https:health' is not tcp, http:/PATH, "
                                           "https:/PATH, udp:HEX or none"),
                          ("https:/a b", "'/a b' contains whitespace or control characters")]:
        with pytest.raises(ConfigError) as e:
            monitor_from_flags(kind, None, 2.0, 2, 3)
        assert e.value.problems == [("--check", problem)]


def test_one_line_udp_monitor():
    """udp:HEX: the datagram each check sends, whitespace ignored, written back
    in lowercase; any reply passes (expect_hex is the config file's)."""
    m = monitor_from_flags("udp:1B 00\t0a", "53", 2.0, 2, 3)
    assert (m.type, m.send_hex, m.expect_hex, m.port) == ("udp", "1b000a", None, 53)
    assert monitor_from_flags("tcp", None, 2.0, 2, 3).send_hex is None
    for kind, problem in [("udp:", "no bytes: give them as hex digits, such as 1b00"),
                          ("udp", "'udp' is not tcp, http:/PATH, https:/PATH, udp:HEX or none"),
                          ("udp:0x1b", "'x' is not a hex digit (0-9, a-f; whitespace is ignored)"),
                          ("udp:1b0", "3 hex digits, an odd number: two make a byte"),
                          ("udp:1", "1 hex digit, an odd number: two make a byte"),
                          ("udp:" + "00" * 65508,
                           "65508 bytes: a UDP datagram carries at most 65507")]:
        with pytest.raises(ConfigError) as e:
            monitor_from_flags(kind, None, 2.0, 2, 3)
        assert e.value.problems == [("--check", problem)]


def test_one_line_monitor_takes_each_limit_itself():
    """The largest datagram, path, rise and fall are taken; one more is
    refused (above)."""
    m = monitor_from_flags("udp:" + "00" * 65507, None, 2.0, 1000, 1000)
    assert (len(m.send_hex), m.rise, m.fall) == (2 * 65507, 1000, 1000)
    assert monitor_from_flags("http:/" + "a" * 4095, None, 2.0, 2, 3).path == "/" + "a" * 4095


def test_one_line_monitor_errors():
    with pytest.raises(ConfigError) as e:
        monitor_from_flags("https", "0", 0, 0, 1)
    assert e.value.problems == [
        ("--check", "'https' is not tcp, http:/PATH, https:/PATH, udp:HEX or none"),
        ("--check-port", "port 0 is out of range 1-65535"),
        ("--interval", "must be a positive number of seconds, got 0"),
        ("--rise", "must be at least 1, got 0")]
    # With --check none too: a wrong value is a mistake whether a check runs or not.
    with pytest.raises(ConfigError) as e:
        monitor_from_flags("none", "0", float("nan"), 2, -5)
    assert [name for name, _ in e.value.problems] == ["--check-port", "--interval", "--fall"]


@pytest.mark.parametrize("args,problem", [
    (("tcp", None, float("inf"), 2, 3), ("--interval", "must be a positive number of seconds, "
                                                       "got inf")),
    (("tcp", None, 86401.0, 2, 3), ("--interval", "must be at most 86400 seconds (a day), "
                                                  "got 86401.0")),
    (("tcp", None, 2.0, 1001, 3), ("--rise", "must be at most 1000, got 1001")),
    # --check-port as --vip's port: TOML's `port = 080` is no number either
    (("tcp", "080", 2.0, 2, 3), ("--check-port", "port '080' has a leading zero")),
    (("tcp", "8_080", 2.0, 2, 3), ("--check-port", "port '8_080' is not a number")),
    (("http:/a b", None, 2.0, 2, 3), ("--check", "'/a b' contains whitespace or control "
                                                 "characters")),
    (("http:/caf\u00e9", None, 2.0, 2, 3), ("--check", "'/caf\u00e9' is not ASCII: "
                                                        "percent-encode it")),
    # a flag's byte that is not UTF-8 (a lone surrogate) is no whitespace
    (("http:/caf\udce9", None, 2.0, 2, 3), ("--check", "'/caf\\xe9' is not ASCII: "
                                                        "percent-encode it")),
])
def test_one_line_monitor_takes_what_a_file_takes(args, problem):
    """The one-line form refuses what a config file refuses: a saved config of
    flags must load again when a later `xlb up` takes it over."""
    with pytest.raises(ConfigError) as e:
        monitor_from_flags(*args)
    assert e.value.problems == [problem]


def test_a_port_of_other_digits_is_not_a_number():
    with pytest.raises(ValueError, match="port '\u00b2' is not a number"):
        parse_port("\u00b2")


def test_a_port_of_more_digits_than_int_reads_is_out_of_range():
    """Not int()'s message of its limit (4300 digits), which tells to raise it."""
    with pytest.raises(ValueError) as e:
        parse_port("9" * 4301)
    assert str(e.value) == f"port {'9' * 60}... (4,301 characters) is out of range 1-65535"


def test_one_line_form_timeouts_are_ipvs_defaults():
    (fe,) = from_flags(["10.1.1.101:80"], B).frontends
    assert fe.timeouts == (60, 900, 120, 300)


@pytest.mark.parametrize("size,message", [
    (65536, "must be a prime, got 65536 (65521 and 65537 are)"),
    (100, "must be a prime, got 100 (97 and 101 are)"),
    (4, "must be a prime, got 4 (3 and 5 are)"),
    (1, "must be a prime, got 1"),
    (-7, "must be a prime, got -7"),
    (65539, "65539 is larger than the data plane's tables (65537)"),
])
def test_bad_maglev_sizes(size, message):
    with pytest.raises(ValueError) as e:
        check_maglev_size(size)
    assert str(e.value) == message


def test_maglev_size_needs_100_slots_per_server():
    assert check_maglev_size(65537) == 65537 and check_maglev_size(101) == 101
    check_maglev_servers(101, 1)
    check_maglev_servers(65537, MAGLEV_SERVERS_MAX)
    with pytest.raises(ValueError, match="^101 slots are too few for 2 servers: 100 per server "
                                         "needs a prime of at least 200, such as 211$"):
        check_maglev_servers(101, 2)
    with pytest.raises(ValueError, match="^97 slots are too few for 1 server: 100 per server "
                                         "needs a prime of at least 100, such as 101$"):
        check_maglev_servers(97, 1)


def test_one_line_form_with_maglev():
    (pool,) = from_flags(["10.1.1.101:80"], B, algorithm="maglev").pools
    assert (pool.algorithm, pool.maglev_size) == ("maglev", 65537)
    many = [f"10.1.{11 + i // 250}.{1 + i % 250}:80" for i in range(MAGLEV_SERVERS_MAX + 1)]
    assert len(from_flags(["10.1.1.101:80"], many[:-1], algorithm="maglev").pools[0].servers) \
        == MAGLEV_SERVERS_MAX
    with pytest.raises(ConfigError) as e:
        from_flags(["10.1.1.101:80"], many, algorithm="maglev")
    assert e.value.problems == [("--backend", "656 backends are too many for maglev: at most 655")]


def test_one_line_form_with_source():
    """--algorithm source: a Maglev pool, held to maglev's limits."""
    (pool,) = from_flags(["10.1.1.101:80"], B, algorithm="source").pools
    assert (pool.algorithm, pool.maglev_size) == ("source", 65537)
    many = [f"10.1.{11 + i // 250}.{1 + i % 250}:80" for i in range(MAGLEV_SERVERS_MAX + 1)]
    with pytest.raises(ConfigError) as e:
        from_flags(addresses(MAX_MAGLEV_FRONTENDS + 1), many, algorithm="source")
    assert e.value.problems == [
        ("--backend", "656 backends are too many for source: at most 655"),
        ("--vip", "17 VIPs with --algorithm source: the data plane holds 16")]


def addresses(n: int, port: int = 80) -> list[str]:
    return [f"10.2.{i // 250}.{1 + i % 250}:{port}" for i in range(n)]


def test_one_line_form_runs_on_no_more_links_than_the_data_plane_holds():
    """tx_links holds MAX_LINKS: the attach past them failed, after the others."""
    names = [f"v{i}" for i in range(MAX_LINKS + 1)]
    assert from_flags(["10.1.1.101:80"], B, names[:-1]).attach_names() == tuple(names[:-1])
    with pytest.raises(ConfigError) as e:
        from_flags(["10.1.1.101:80"], B, names)
    assert e.value.problems == [("--iface", "1025 interfaces: the data plane holds 1024")]


def test_one_line_form_holds_what_the_data_plane_holds():
    """As a config file's check_capacity: refused here, before `xlb up` goes on
    to the maps (and before root is asked for)."""
    assert len(from_flags(addresses(MAX_FRONTENDS), B).frontends) == MAX_FRONTENDS
    assert len(from_flags(["10.1.1.101:80"], addresses(RING_SIZE, 8080)).pools[0].servers) \
        == RING_SIZE
    assert len(from_flags(addresses(MAX_MAGLEV_FRONTENDS), B, algorithm="maglev").frontends) \
        == MAX_MAGLEV_FRONTENDS
    for vips, backends, algorithm, problem in (
            (addresses(MAX_FRONTENDS + 1), B, "roundrobin",
             ("--vip", "257 VIPs: the data plane holds 256")),
            (addresses(MAX_MAGLEV_FRONTENDS + 1), B, "maglev",
             ("--vip", "17 VIPs with --algorithm maglev: the data plane holds 16")),
            (["10.1.1.101:80"], addresses(RING_SIZE + 1, 8080), "roundrobin",
             ("--backend", "1025 backends do not fit a ring of 1024"))):
        with pytest.raises(ConfigError) as e:
            from_flags(vips, backends, algorithm=algorithm)
        assert e.value.problems == [problem]
