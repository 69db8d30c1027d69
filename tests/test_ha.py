"""High availability without a kernel: the keepalived and BIRD configs xlb
writes (BIRD's, and the lab router's, checked by BIRD's own parser where it
is installed), the FIFO lines it follows, the gratuitous ARP it sends, the
role metrics, and the `xlb ha` commands' bad input; in namespaces of their
own, keepalived reading the config xlb writes and running `xlb ha follow`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest
from click.testing import CliRunner

from xlb import config as configfile, ha, metrics
from xlb.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "netns-lab" / "seed.toml"
EXAMPLES = ROOT / "netns-lab" / "ha-examples"


def seed():
    return configfile.load_file(SEED)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), standalone_mode=False, catch_exceptions=True)


def test_gratuitous_arp_is_an_announcement_as_scapy_reads_it():
    from scapy.layers.l2 import ARP, Ether
    mac = bytes.fromhex("020000000b01")
    pkt = Ether(ha.garp_frame(mac, IPv4Address("10.1.1.101")))
    assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.src == "02:00:00:00:0b:01"
    arp = pkt[ARP]
    assert arp.op == 1 and arp.psrc == arp.pdst == "10.1.1.101"
    assert arp.hwsrc == "02:00:00:00:0b:01" and arp.hwdst == "00:00:00:00:00:00"


def test_keepalived_fifo_lines():
    assert ha.keepalived_role('INSTANCE "xlb" MASTER 250', "xlb") == "active"
    for state in ("BACKUP", "FAULT", "STOP"):
        assert ha.keepalived_role(f'INSTANCE "xlb" {state} 250', "xlb") == "backup"
    assert ha.keepalived_role('INSTANCE "other" MASTER 250', "xlb") is None
    assert ha.keepalived_role('GROUP "xlb" MASTER', "xlb") is None
    assert ha.keepalived_role("", "xlb") is None
    assert [ha.keepalived_instance(line) for line in
            ('INSTANCE "web" MASTER 250', 'INSTANCE web MASTER', 'GROUP "xlb" MASTER', "")] == \
        ["web", None, None, None]


def test_served_vips_need_a_server_taking_flows():
    cfg = seed()
    assert ha.served_vips(cfg, {"www": 2}) == {IPv4Address("10.1.1.101")}
    assert ha.served_vips(cfg, {"www": 1}) == {IPv4Address("10.1.1.101")}      # one is enough
    assert ha.served_vips(cfg, {"www": 0}) == ha.served_vips(cfg, {}) == frozenset()


def test_gateways_and_tables():
    assert ha.Gateway.parse("10.1.11.1/24@eth1") == ha.Gateway(IPv4Interface("10.1.11.1/24"),
                                                               "eth1")
    assert ha.Gateway.parse("10.1.11.1/24").interface is None
    # A /31 has no network or broadcast address (RFC 3021): both are hosts'.
    for point_to_point in ("10.1.11.0/31", "10.1.11.1/31"):
        assert str(ha.Gateway.parse(point_to_point).address) == point_to_point
    for bad, why in (("10.1.11.1", "give the address with its prefix"),
                     ("10.1.11.300/24", "is not IP/PREFIX"),
                     ("gw@eth1", "give the address with its prefix")):
        with pytest.raises(ValueError, match=f"^'{bad}'.? {why}"):
            ha.Gateway.parse(bad)
    assert [ha.check_table(t) for t in (1, 100, 252, 256, 2**32 - 1)] == \
        [1, 100, 252, 256, 2**32 - 1]
    for bad in (0, 253, 254, 255, 2**32):
        with pytest.raises(ValueError, match=f"^table {bad}: "):
            ha.check_table(bad)


def keepalived_text(config=None, **kw) -> str:
    args = dict(xlb="/usr/local/bin/xlb", peer=IPv4Address("10.1.11.12"), interface="eth1",
                priority=250, advert_int=0.1, vrid=51, fifo="/run/xlb-keepalived.fifo",
                track_file="/run/xlb-keepalived.serving", gateways=[ha.Gateway(IPv4Interface("10.1.11.1/24"))])
    return ha.keepalived_conf(config or seed(), **{**args, **kw})


def test_keepalived_config_elects_without_owning_the_vip():
    text = keepalived_text()
    assert "10.1.1.101" not in text.split("vrrp_instance")[1]    # the VIP is no address
    assert "10.1.11.1/24 dev eth1" in text
    assert ('vrrp_notify_fifo_script "/usr/local/bin/xlb ha follow --instance xlb '
            '--track-file /run/xlb-keepalived.serving"') in text
    # Until follow has seen xlb serve, and while it does not, the node is in FAULT.
    assert ('track_file xlb_serves {\n    file "/run/xlb-keepalived.serving"\n    weight 0\n'
            '    init_file 1 overwrite\n}\n') in text
    assert "    track_file {\n        xlb_serves\n    }\n" in text.split("vrrp_instance")[1]
    for line in ("vrrp_version 3", "state BACKUP", "nopreempt", "advert_int 0.1",
                 "priority 250", "virtual_router_id 51", "interface eth1"):
        assert f"    {line}\n" in text


def many_vips(n: int = 256):
    """The seed's service on n VIPs (round-robin: the data plane holds 16
    frontends on Maglev, 256 in all)."""
    text = SEED.read_text().split("[frontends.")[0]
    for i in range(n):
        text += (f'\n[frontends.f{i}]\nvip = "10.200.{i // 200}.{i % 200 + 1}"\nport = 80\n'
                 f'protocol = "tcp"\npool = "was"\n')
    return configfile.load(text)


# keepalived reads its config a line at a time into a buffer of 1024 bytes
# (MAXBUF): what is beyond is read as the next line, a comment's tail as keywords.
KEEPALIVED_MAXBUF = 1024


def test_keepalived_config_lines_fit_keepalived_buffer():
    """A config with many VIPs (the data plane holds 256): the comment that
    names them must not make a line keepalived splits (`keepalived -t` then
    fails on "Unknown keyword '.0.75,'")."""
    text = keepalived_text(config=many_vips())
    assert max(len(line.encode()) for line in text.splitlines()) < KEEPALIVED_MAXBUF - 1
    named = {v for line in text.splitlines() if line.startswith("#")
             for v in line.replace(",", " ").split() if v.startswith("10.200.")}
    assert len(named) == 256          # every VIP still named


def test_keepalived_config_lines_fit_keepalived_buffer_with_the_longest_paths():
    """Paths as long as check_keepalived_path takes them (a 3 kB one was
    written whole): the FAULT notify's line holds two of them."""
    longest = {name: ha.check_keepalived_path(f"/{name[0]}/" + "x" * (ha.KEEPALIVED_PATH_MAX - 3))
               for name in ("xlb", "fifo", "track_file")}
    text = keepalived_text(**longest)
    assert max(len(line.encode()) for line in text.splitlines()) < KEEPALIVED_MAXBUF - 1
    assert ha.KEEPALIVED_LINE == KEEPALIVED_MAXBUF


def test_bird_config_announces_the_table_with_bfd():
    text = ha.bird_conf(seed(), router=IPv4Address("10.1.2.1"), local_as=65001, peer_as=65000,
                        table=100)
    assert "kernel table 100;" in text and "learn;" in text
    assert "neighbor 10.1.2.1 as 65000;" in text and "local as 65001;" in text
    assert "bfd on;" in text and "min rx interval 100 ms;" in text and "multiplier 3;" in text
    assert 'export where proto = "xlb_vips" && net.len = 32;' in text


BIRD_ARGS = ["ha", "bird", "--router", "10.1.2.1", "--as", "65001", "--peer-as", "65000",
             "--router-id", "10.1.2.11", str(SEED)]
needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 is not installed")


def bird_parse(conf: Path) -> None:
    r = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, f"{conf.name}: {r.stderr}"


@needs_bird
def test_bird_parses_what_xlb_writes(tmp_path):
    """`xlb ha bird`'s output for the seed, as BIRD 2 reads it (bird -p)."""
    r = run(*BIRD_ARGS)
    assert r.exit_code == 0, r.output
    assert "protocol bgp" in r.stdout
    conf = tmp_path / "bird.conf"
    conf.write_text(r.stdout)
    bird_parse(conf)


@needs_bird
def test_bird_parses_the_labs_router_config():
    """netns-lab/ha-examples/bird-router.conf, which xlb does not write: the
    router that netns-lab/ha-ecmp.sh runs in front of the xlb nodes."""
    bird_parse(EXAMPLES / "bird-router.conf")


def test_examples_are_what_the_commands_print():
    """The configs in netns-lab/ha-examples/ are the commands' output for the seed."""
    ka = ["ha", "keepalived", "--interface", "eth1", "--advert-int", "0.1",
          "--gateway", "10.1.11.1/24", "--xlb", "/usr/local/bin/xlb"]
    cases = {
        "keepalived-lb1.conf": ka + ["--peer", "10.1.11.12", "--priority", "250", str(SEED)],
        "keepalived-lb2.conf": ka + ["--peer", "10.1.11.11", "--priority", "240", str(SEED)],
        "bird-node1.conf": BIRD_ARGS,
    }
    for name, args in cases.items():
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert r.stdout == (EXAMPLES / name).read_text(), name


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("keepalived") is None or os.geteuid() != 0,
                    reason="keepalived -t needs keepalived, and root for a namespace")
def test_keepalived_accepts_what_xlb_writes(tmp_path):
    """`xlb ha keepalived`'s output as keepalived reads it (keepalived -t), in
    a namespace of its own that has the links the config names."""
    ns = f"xlbka-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "eth1", "type", "veth", "peer", "eth2"],
                       check=True)
        for args in (["--gateway", "10.1.11.1/24"],
                     ["--advert-int", "0.03", "--gateway", "10.1.11.1/24",
                      "--gateway", "10.1.12.1/24@eth2", "--xlb", "/opt/xlb-1.2/bin/xlb"]):
            r = run("ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth1", *args,
                    str(SEED))
            assert r.exit_code == 0, r.output
            conf = tmp_path / "keepalived.conf"
            conf.write_text(r.stdout)
            r = subprocess.run(["ip", "netns", "exec", ns, "keepalived", "-t", "-f", str(conf)],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns])


# A namespace of its own, network and mounts, whose /dev is a tmpfs with the
# devices keepalived and xlb use and /dev/log bound to the test's socket.
SYSLOG_SANDBOX = """
mount --make-rprivate /
mount -t tmpfs -o mode=755 dev /dev
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; mknod -m 666 /dev/urandom c 1 9
touch /dev/log; mount --bind "$1" /dev/log
ip link set lo up
ip link add eth1 type veth peer eth2
ip addr add 10.1.11.11/24 dev eth1
ip link set eth1 up; ip link set eth2 up
exec keepalived --vrrp --dont-fork --use-file "$2" --pid "$3/ka.pid" --vrrp_pid "$3/vrrp.pid"
"""


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("keepalived") is None or os.geteuid() != 0,
                    reason="needs keepalived, and root for a namespace")
def test_what_follow_says_under_keepalived_reaches_syslog(tmp_path):
    """keepalived runs its FIFO script with stderr on /dev/null: what `xlb ha
    follow` says there (here: no xlb runs, so the role that keepalived's
    FAULT asks for cannot be delivered) must reach syslog, or nobody reads it."""
    conf = tmp_path / "keepalived.conf"
    r = run("ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth1",
            "--gateway", "10.1.11.1/24", "--fifo", str(tmp_path / "fifo"),
            "--track-file", str(tmp_path / "serving"),
            "--xlb", str(ROOT / ".venv" / "bin" / "xlb"), str(SEED))
    assert r.exit_code == 0, r.output
    conf.write_text(r.stdout)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
        log.bind(str(tmp_path / "log"))
        log.settimeout(30)
        keepalived = subprocess.Popen(
            ["unshare", "--mount", "--net", "sh", "-c", SYSLOG_SANDBOX, "sh",
             str(tmp_path / "log"), str(conf), str(tmp_path)],
            env={**os.environ, "XLB_STATE_DIR": str(tmp_path / "state")},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            lines = []
            while not any("xlb ha follow: role backup not delivered yet" in line
                          for line in lines):
                lines.append(log.recv(4096).decode(errors="replace"))
        finally:
            keepalived.terminate()
            assert keepalived.wait(30) == 0, keepalived.stderr.read()
    said = [line for line in lines if "xlb ha follow" in line]
    assert said[0].startswith("<27>") and " xlb[" in said[0], said    # daemon.err


KA = ["ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth1"]


@pytest.mark.parametrize("args, message", [
    (["ha", "keepalived", "--peer", "10.1.11", "--interface", "eth1", str(SEED)],
     "--peer: '10.1.11' is not an IPv4 address"),
    (["ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth1", "--gateway",
      "10.1.1.101/24", str(SEED)],
     "--gateway 10.1.1.101/24: a VIP, which keepalived would make an address of the active"),
    (["ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth1", "--gateway",
      "10.1.11.1", str(SEED)], "--gateway: '10.1.11.1': give the address with its prefix"),
    ([*KA, "--gateway", "10.1.11.1/24@", str(SEED)],
     "--gateway: an interface name cannot be empty"),
    ([*KA, "--gateway", "127.0.0.1/8", str(SEED)],
     "--gateway: '127.0.0.1' is a loopback address, not a host's"),
    ([*KA, "--gateway", "10.1.11.1/24", "--gateway", "10.1.11.1/24@eth2", str(SEED)],
     "--gateway: an address given twice"),
    (["ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth 1", str(SEED)],
     "--interface: 'eth 1' is not an interface name"),
    ([*KA, "--fifo", "/run/a b", str(SEED)],
     "--fifo: '/run/a b' contains whitespace"),
    (["ha", "keepalived", "--peer", "10.1.1.101", "--interface", "eth1", "--gateway",
      "10.1.11.1/24", str(SEED)], "--peer 10.1.1.101: a VIP, not the other node's address"),
    # What keepalived would refuse or misread (keepalived -t).
    ([*KA, str(SEED)], "--gateway: at least one is needed"),
    ([*KA, "--advert-int", "nan", str(SEED)], "Invalid value for '--advert-int': 'nan' is "
                                               "not a number in digits 0-9"),
    ([*KA, "--advert-int", "0.015", str(SEED)], "--advert-int: 0.015 is not a whole number"),
    ([*KA, "--advert-int", "0.1001", str(SEED)], "--advert-int: 0.1001 is not a whole number"),
    ([*KA, "--fifo", "", str(SEED)], "--fifo: a path cannot be empty"),
    ([*KA, "--fifo", "run/xlb.fifo", str(SEED)], "--fifo: 'run/xlb.fifo' is not absolute"),
    ([*KA, "--track-file", "xlb.serving", str(SEED)],
     "--track-file: 'xlb.serving' is not absolute"),
    ([*KA, "--track-file", "/run/a#b", str(SEED)], "--track-file: '/run/a#b' contains"),
    # A byte that is not UTF-8 (a lone surrogate) was said to be whitespace.
    ([*KA, "--fifo", "/run/\udcff", str(SEED)], "--fifo: '/run/\\xff' is not UTF-8, as the "
                                                "keepalived config xlb writes is"),
    ([*KA, "--xlb", "/opt/\udcff", str(SEED)], "--xlb: '/opt/\\xff' is not UTF-8"),
    ([*KA, "--gateway", "10.1.11.1/24", "--track-file", "/run/xlb-keepalived.fifo", str(SEED)],
     "--track-file: the same path as --fifo"),
    ([*KA, "--gateway", "10.1.11.1/24", "--fifo", "/run/a", "--track-file", "/run//a",
      str(SEED)], "--track-file: the same path as --fifo"),
    ([*KA, "--gateway", "10.1.11.1/24", "--fifo", "/run/", str(SEED)],
     "--fifo: '/run/' is a directory, not a file keepalived can make"),
    ([*KA, "--gateway", "10.1.11.1/24", "--track-file", "/tmp", str(SEED)],
     "--track-file: '/tmp' is a directory"),
    ([*KA, "--gateway", "10.1.11.12/24", str(SEED)],
     "--gateway 10.1.11.12/24: the peer's own address"),
    # A server's address on a balancer node: that node's `xlb up` refuses it
    # (a local address), or, moved there by keepalived, it would take the server's.
    ([*KA, "--gateway", "10.1.11.101/24", str(SEED)],
     "--gateway 10.1.11.101/24: the address of servers.was1, which keepalived would make "
     "an address of the active node"),
    (["ha", "keepalived", "--peer", "10.1.11.102", "--interface", "eth1", "--gateway",
      "10.1.11.1/24", str(SEED)], "--peer 10.1.11.102: the address of servers.was2, not "
                                  "the other node's address"),
    ([*KA, "--gateway", "10.1.11.0/24", str(SEED)],
     "--gateway: '10.1.11.0/24': not a host's address on 10.1.11.0/24"),
    ([*KA, "--gateway", "10.1.11.255/24", str(SEED)],
     "--gateway: '10.1.11.255/24': not a host's address"),
    ([*KA, "--gateway", "10.1.11.1/0", str(SEED)], "--gateway: '10.1.11.1/0': not a host's"),
    ([*KA, "--xlb", '/opt/x"y', str(SEED)], "--xlb: '/opt/x\"y' contains whitespace, # ! { }"),
    ([*KA, "--xlb", "/opt/x'y", str(SEED)], "--xlb: \"/opt/x'y\" contains whitespace"),
    ([*KA, "--fifo", "/run/x{y", str(SEED)], "--fifo: '/run/x{y' contains whitespace"),
    ([*KA, "--xlb", "/opt/my xlb/xlb", str(SEED)], "--xlb: '/opt/my xlb/xlb' contains"),
    (["ha", "keepalived", "--peer", "10.1.11.12", "--interface", "lo", "--gateway",
      "10.1.11.1/24", str(SEED)], "--interface lo: the loopback reaches no other node"),
    ([*KA, "--gateway", "10.1.11.1/24@lo", str(SEED)],
     "--gateway 10.1.11.1/24@lo: the loopback reaches no backend"),
    # A warning found before the error is not said: bad input is one line.
    ([*KA, "--fifo", "/nonexistent-xlb/k.fifo", str(SEED)], "--gateway: at least one is needed"),
    (["ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth#0", str(SEED)],
     "--interface: 'eth#0': keepalived reads # ! { } quotes and backslashes specially"),
    (["ha", "keepalived", "--peer", "10.1.11.12", "--interface", "e{1", str(SEED)],
     "--interface: 'e{1': keepalived reads"),
    (["ha", "keepalived", "--peer", "10.1.11.12", "--interface", 'q"1', str(SEED)],
     "--interface: 'q\"1': keepalived reads"),
    ([*KA, "--gateway", "10.1.11.1/24@e}2", str(SEED)], "--gateway: 'e}2': keepalived"),
    ([*KA, "--gateway", "10.1.11.1/24@eth!2", str(SEED)], "--gateway: 'eth!2': keepalived"),
    # IPv4Interface reads /024 as /24, `ip addr add` as /20 (octal).
    ([*KA, "--gateway", "10.1.11.1/024", str(SEED)],
     "--gateway: '10.1.11.1/024': prefix '024' has a leading zero"),
    # A line of keepalived's config is at most 1023 bytes: what is beyond is read as
    # another line. Both paths of the FAULT notify's line, each at most 400, fit.
    ([*KA, "--gateway", "10.1.11.1/24", "--fifo", "/run/" + "f" * 396, str(SEED)],
     f"--fifo: '/run/{'f' * 55}'... (401 characters) is longer than 400 bytes: keepalived "
     f"reads a line of its config into 1024"),
    ([*KA, "--gateway", "10.1.11.1/24", "--xlb", "/opt/" + "é" * 200, str(SEED)],
     "--xlb: '/opt/" + "é" * 55 + "'... (205 characters) is longer than 400 bytes"),
    # A control character was said to be whitespace.
    (["ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth\x01", str(SEED)],
     "--interface: 'eth\\x01' contains a control character ('\\x01'): xlb takes none in an "
     "interface name"),
    ([*KA, "--gateway", "10.1.11.1/24@e\x7f", str(SEED)],
     "--gateway: 'e\\x7f' contains a control character ('\\x7f')"),
    ([*KA, "--gateway", "10.1.11.1/24", "--fifo", "/run/x\x1b[2Jy", str(SEED)],
     "--fifo: '/run/x\\x1b[2Jy' contains a control character ('\\x1b'), which the keepalived "
     "config xlb writes cannot hold"),
    ([*KA, "--gateway", "10.1.11.1/24", "--xlb", "/opt/x\u202ey", str(SEED)],
     "--xlb: '/opt/x\\u202ey' contains a character that does not print ('\\u202e')"),
    (["ha", "bird", "--router", "10.1.2.1", "--as", "65001", "--peer-as", "65001", str(SEED)],
     "--peer-as 65001: the same as --as"),
    (["ha", "bird", "--router", "10.1.1.101", "--as", "65001", "--peer-as", "65000", str(SEED)],
     "--router 10.1.1.101: a VIP, not the router's address"),
    (["ha", "bird", "--router", "10.1.11.101", "--as", "65001", "--peer-as", "65000", str(SEED)],
     "--router 10.1.11.101: the address of servers.was1, not the router's address"),
    (["ha", "bird", "--router", "10.1.2.1", "--as", "65001", "--peer-as", "65000",
      "--table", "254", str(SEED)], "--table: table 254"),
    (["ha", "bird", "--router", "10.1.2.1", "--as", "65001", "--peer-as", "65000",
      "--router-id", "0.0.0.0", str(SEED)], "--router-id: 0.0.0.0 is no router id"),
    (["ha", "bird", "--router", "10.1.2.1", "--as", "65001", "--peer-as", "65000",
      "/nonexistent.toml"], "/nonexistent.toml"),
    (["up", "--vip", "10.1.1.101:80", "--backend", "10.1.11.101:8080",
      "--announce-table", "255"], "--announce-table: table 255"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "xlb"), *args], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_role_metrics():
    from test_metrics import STATUS, samples
    st = {**STATUS, "ha": {"role": "backup", "announce_table": 100, "announcing": []}}
    got = samples(metrics.render(st, {}))
    assert got[("xlb_node_role", (("role", "backup"),))] == 1
    assert got[("xlb_node_role", (("role", "active"),))] == 0
    assert got[("xlb_bgp_announcing", (("vip", "10.1.1.101"),))] == 0
    st["ha"] = {"role": "active", "announce_table": 100, "announcing": ["10.1.1.101"]}
    assert samples(metrics.render(st, {}))[("xlb_bgp_announcing", (("vip", "10.1.1.101"),))] == 1
    st["ha"] = {"role": "active", "announce_table": None, "announcing": []}
    assert not any(k[0] == "xlb_bgp_announcing" for k in samples(metrics.render(st, {})))


def test_an_xlb_at_a_path_keepalived_would_misread_needs_xlb(tmp_path):
    """Without --xlb, the config runs this xlb by its own path: one with a
    space would be split by keepalived, and `xlb ha follow` would never run."""
    (tmp_path / "bin dir").mkdir()
    xlb = tmp_path / "bin dir" / "xlb"
    xlb.symlink_to(ROOT / ".venv" / "bin" / "xlb")
    args = [*KA, "--gateway", "10.1.11.1/24", str(SEED)]
    r = subprocess.run([str(xlb), *args], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"xlb: error: --xlb not given, and this xlb's own path: {str(xlb)!r} "
                        f"contains whitespace, # ! {{ }}, a quote or a backslash, which "
                        f"keepalived would misread; give --xlb\n")
    r = subprocess.run([str(xlb), *args, "--xlb", "/usr/local/bin/xlb"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "/usr/local/bin/xlb ha follow" in r.stdout, r.stderr


GARP_PROBE = """
import json, socket
from ipaddress import IPv4Address
from xlb import ha
vip, mac = IPv4Address("10.1.1.101"), bytes.fromhex("020000000b01")
listen = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
listen.bind(("up1", 0))
listen.settimeout(2)
sent, unsent = ha.send_garp({(socket.if_nametoindex("down0"), vip): mac,
                             (socket.if_nametoindex("up0"), vip): mac, (99999, vip): mac})
print(json.dumps([sent, unsent, listen.recv(100)[:42].hex()]))
"""


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="links of its own need root, for a namespace")
def test_a_gratuitous_arp_that_cannot_go_out_leaves_the_others_going(tmp_path):
    """Becoming active, xlb announces each VIP on each of its links: a link
    that is down (or gone) takes none, and says so, and the next still gets
    its own."""
    ns = f"xlbga-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for pair, state in (("up", "up"), ("down", "down")):
            subprocess.run(["ip", "-n", ns, "link", "add", f"{pair}0", "type", "veth", "peer",
                            f"{pair}1"], check=True)
            for end in "01":
                subprocess.run(["ip", "-n", ns, "link", "set", f"{pair}{end}", state],
                               check=True)
        r = subprocess.run(["ip", "netns", "exec", ns, str(ROOT / ".venv" / "bin" / "python"),
                            "-c", GARP_PROBE], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        sent, unsent, frame = json.loads(r.stdout)
        assert sent == 1
        assert unsent == ["10.1.1.101 on down0: Network is down",
                          "10.1.1.101 on ifindex 99999: No such device or address"]
        assert bytes.fromhex(frame) == ha.garp_frame(bytes.fromhex("020000000b01"),
                                                     IPv4Address("10.1.1.101"))
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_gratuitous_arps_without_a_packet_socket_are_said_unsent(monkeypatch):
    """An apply announces the VIPs once the maps are written: a process that
    may not open a packet socket (no CAP_NET_RAW) gets every announcement
    named unsent, not an exception that would fail an apply that took effect."""
    def refused(*args):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(socket, "socket", refused)
    assert ha.send_garp({(7, IPv4Address("10.1.1.101")): b"\2" * 6}) == \
        (0, ["10.1.1.101 on ifindex 7: Operation not permitted"])


def test_a_peer_that_is_an_address_of_this_host_is_warned_of(monkeypatch):
    """README's command run as it is on both nodes gives the second one its own
    address as --peer: its keepalived sends its adverts to itself, never hears
    the other, and both nodes become MASTER (both hold the gateway and both
    xlb answer ARP for the VIPs). The command runs on the node (its output
    goes to /etc/keepalived): it says so, and still writes the config (the
    peer's may be written from this node)."""
    from xlb import netif
    here = netif.Link(index=2, name="eth1", mac=b"\2" * 6, up=True, loopback=False,
                      addresses=(IPv4Interface("10.1.11.12/24"),))
    monkeypatch.setattr(netif, "links", lambda: [here])
    r = CliRunner().invoke(cli, [*KA, "--gateway", "10.1.11.1/24", str(SEED)])
    assert r.exit_code == 0 and "unicast_peer {\n        10.1.11.12\n" in r.stdout
    assert r.stderr == ("xlb: warning: --peer 10.1.11.12: an address of this host (on eth1): "
                        "keepalived here would send its adverts to itself and both nodes "
                        "would become MASTER; give the other node's address\n")
    r = CliRunner().invoke(cli, ["ha", "keepalived", "--peer", "10.1.11.11", "--interface",
                                 "eth1", "--gateway", "10.1.11.1/24", str(SEED)])
    assert r.exit_code == 0 and r.stderr == ""


def test_a_gateway_that_is_an_address_of_this_host_is_warned_of(monkeypatch):
    """The backends' gateway is keepalived's to move: a node that holds it as
    its own address (the single balancer's setup, turned into a pair) holds
    it while the other node is active too, and both answer ARP for it. On the
    active node keepalived's own looks the same: the warning says so."""
    from xlb import netif
    here = netif.Link(index=2, name="eth1", mac=b"\2" * 6, up=True, loopback=False,
                      addresses=(IPv4Interface("10.1.11.11/24"), IPv4Interface("10.1.11.1/24")))
    monkeypatch.setattr(netif, "links", lambda: [here])
    r = CliRunner().invoke(cli, [*KA, "--gateway", "10.1.11.1/24", str(SEED)])
    assert r.exit_code == 0 and "10.1.11.1/24 dev eth1" in r.stdout
    assert r.stderr == ("xlb: warning: --gateway 10.1.11.1/24: an address of this host "
                        "already (on eth1); unless keepalived added it (this node active), "
                        "remove it: held here while the other node is active, both would "
                        "answer ARP for the backends' gateway\n")
    r = CliRunner().invoke(cli, [*KA, "--gateway", "10.1.11.254/24", str(SEED)])
    assert r.exit_code == 0 and r.stderr == ""


@pytest.fixture
def sigterm_kept():
    """follow, run here, takes SIGTERM (keepalived's stop) for good: a SIGTERM
    to the test run would then fail the test it came in, and the run go on."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.usefixtures("sigterm_kept")
def test_follow_outlives_an_answer_it_does_not_expect(tmp_path, monkeypatch):
    """keepalived starts `xlb ha follow` once and never again: if it ended on an
    answer it did not expect (an instance of an earlier build, whose ping
    says no `cut_off`), keepalived's role would reach xlb no more, nor
    would the track file follow xlb: a node whose xlb then stops keeps the
    gateway, and one restarted stays backup under a MASTER keepalived."""
    from xlb import cli as climod, ctl
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    fifo, track = tmp_path / "fifo", tmp_path / "serving"
    os.mkfifo(fifo, 0o600)
    writer = os.open(fifo, os.O_RDWR)
    os.write(writer, b'INSTANCE "xlb" MASTER 250\n')
    asked, pings = [], []

    def request(cmd, timeout=10.0, **args):
        asked.append((cmd, args.get("role")))
        if cmd == "ping":
            pings.append(1)
            if len(pings) == 3:
                raise climod._KeepalivedStops      # keepalived's SIGTERM
            return {"pid": 4242}                   # an earlier build: no "cut_off"
        return {}

    monkeypatch.setattr(ctl, "request", request)
    monkeypatch.setattr(climod, "FOLLOW_POLL", 0.01)
    try:
        r = CliRunner().invoke(cli, ["ha", "follow", "--track-file", str(track), str(fifo)])
    finally:
        os.close(writer)
    assert r.exception is None and r.exit_code == 0, r.output
    assert ("role", "active") in asked and asked[-1] == ("role", "backup")
    assert track.read_text() == "0\n"


def keepalived_command(text: str, keyword: str) -> list[str]:
    """The command of a config's line `KEYWORD "COMMAND"`, split as keepalived splits it."""
    line = next(x for x in text.splitlines() if x.strip().startswith(f"{keyword} "))
    return line.split('"')[1].split()


@pytest.mark.usefixtures("sigterm_kept")
def test_keepalived_holds_a_node_whose_follow_is_gone_in_fault(tmp_path, monkeypatch):
    """`xlb ha follow` killed alone (kill -9, the OOM killer) writes nothing
    more. keepalived checks every second that a follow holds the track file's
    lock (failing, FAULT), and in a FAULT that no follow hears it tells xlb
    backup itself. While follow runs the check succeeds and the notify does
    nothing; ended, the lock is free. The config's commands, run (the notify
    with an echo for xlb). The role follow records while it runs is not
    taken up by the next follow unless keepalived ended this one: killed, it
    could not record what keepalived said after (FAULT)."""
    from xlb import cli as climod, ctl, state
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    fifo, track = tmp_path / "fifo", tmp_path / "serving"
    os.mkfifo(fifo, 0o600)
    writer = os.open(fifo, os.O_RDWR)
    os.write(writer, b'INSTANCE "xlb" MASTER 250\n')
    text = keepalived_text(xlb="/bin/echo", track_file=str(track))
    assert "    track_script {\n        xlb_follows\n    }\n" in text.split("vrrp_instance")[1]
    commands = [keepalived_command(text, "script"), keepalived_command(text, "notify_fault")]
    keepalived = climod._keepalived_process("xlb")

    def check_and_notify():
        return [(r.returncode, r.stdout) for r in
                (subprocess.run(c, capture_output=True, text=True, timeout=10) for c in commands)]

    seen = []

    def request(cmd, timeout=10.0, **args):
        if cmd == "ping":
            seen.append((check_and_notify(), state.followed(keepalived)))
            raise climod._KeepalivedStops      # keepalived's SIGTERM
        return {}

    monkeypatch.setattr(ctl, "request", request)
    try:
        r = CliRunner().invoke(cli, ["ha", "follow", "--track-file", str(track), str(fifo)])
    finally:
        os.close(writer)
    assert r.exception is None and r.exit_code == 0, r.output
    assert seen == [([(0, ""), (0, "")], None)]
    assert check_and_notify() == [(1, ""), (0, "ha role backup\n")]
    assert state.followed(keepalived) == "active"


def test_the_fault_notify_running_is_no_follow_to_the_check(tmp_path):
    """keepalived's FAULT notify holds the track file's lock while it tells xlb
    backup (a follow starting meanwhile waits for it), which takes a Python's
    start, or up to its timeout while xlb does not answer: a check in that
    time must still find no follow there, or the node would leave FAULT (rise
    1), go back 3 checks later, and so on, for as long as no follow runs."""
    track = tmp_path / "serving"
    track.write_text("1\n")
    xlb = tmp_path / "xlb"          # as xlb would be slow: the check runs meanwhile
    text = keepalived_text(xlb=str(xlb), track_file=str(track))
    check = " ".join(keepalived_command(text, "script"))
    xlb.write_text(f'#!/bin/sh\n{check}\necho "$* while the check says $?"\n')
    xlb.chmod(0o700)
    r = subprocess.run(keepalived_command(text, "notify_fault"), capture_output=True,
                       text=True, timeout=10)
    assert (r.returncode, r.stdout) == (0, "ha role backup while the check says 1\n")


@pytest.mark.usefixtures("sigterm_kept")
def test_follow_ended_by_a_failure_hands_the_node_to_the_peer(tmp_path, monkeypatch):
    """Whatever ends follow but keepalived's stop leaves keepalived without it:
    the track file says the node cannot serve (FAULT), and why is said."""
    from xlb import cli as climod, ctl
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    fifo, track = tmp_path / "fifo", tmp_path / "serving"
    os.mkfifo(fifo, 0o600)
    track.write_text("0\n")

    def request(cmd, timeout=10.0, **args):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(ctl, "request", request)
    r = CliRunner().invoke(cli, ["ha", "follow", "--track-file", str(track), str(fifo)])
    assert isinstance(r.exception, RuntimeError)
    assert track.read_text() == "1\n"
    assert "xlb ha follow: ended by RuntimeError: unexpected; keepalived is told" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="a path root owns needs root")
def test_an_xlb_keepalived_would_not_run_is_refused(tmp_path):
    """keepalived (enable_script_security) disables a script in a directory
    another user may write, and `xlb ha follow` never runs: the node stays in
    FAULT for ever (its track file at 1), silently but for keepalived's log."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    xlb = shared / "xlb"
    xlb.symlink_to(ROOT / ".venv" / "bin" / "xlb")
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "xlb"), *KA, "--gateway", "10.1.11.1/24",
                        "--xlb", str(xlb), str(SEED)], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr == (f"xlb: error: --xlb {xlb}: keepalived would not run it: {shared} is "
                        f"owned by uid 0, mode 777: keepalived runs a script "
                        f"(enable_script_security) only if root owns it and every directory "
                        f"above it, and no other user may write them\n")
    shared.chmod(0o755)
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "xlb"), *KA, "--gateway", "10.1.11.1/24",
                        "--xlb", str(xlb), str(SEED)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # keepalived checks the path as given (stat follows the links): root's
    # file behind a link, in another user's directory, it runs.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "xlb").write_text("#!/bin/sh\n")
    (theirs / "xlb").chmod(0o755)
    os.chown(theirs, 1000, 1000)
    xlb.unlink()
    xlb.symlink_to(theirs / "xlb")
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "xlb"), *KA, "--gateway", "10.1.11.1/24",
                        "--xlb", str(xlb), str(SEED)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="a path root owns needs root")
def test_an_xlb_keepalived_cannot_execute_is_refused(tmp_path):
    """keepalived disables a notify script that is not executable (and fails to
    run a directory): `xlb ha follow` would never run, the node in FAULT."""
    plain = tmp_path / "xlb"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    for path in plain, tmp_path:
        r = subprocess.run([str(ROOT / ".venv" / "bin" / "xlb"), *KA, "--gateway",
                            "10.1.11.1/24", "--xlb", str(path), str(SEED)],
                           capture_output=True, text=True)
        assert (r.returncode, r.stdout, r.stderr) == \
            (2, "", f"xlb: error: --xlb: '{path}' is no executable file: keepalived would not "
                    f"run it\n")
    plain.chmod(0o755)
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "xlb"), *KA, "--gateway", "10.1.11.1/24",
                        "--xlb", str(plain), str(SEED)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.usefixtures("sigterm_kept")
def test_keepalived_stopping_leaves_a_role_of_backup_for_xlb_to_adopt(tmp_path, monkeypatch):
    """keepalived stops (its peer takes the gateway) while xlb's control process
    is dead, its data path serving on as active: `follow` cannot tell it
    backup, and ends. The `xlb up` that adopts the data path then (systemd's
    restart) must start as backup, as keepalived last left the node, not
    as the active the dead process saved: nobody would tell it otherwise,
    and both nodes would answer ARP for the VIPs."""
    from xlb import cli as climod, ctl, state
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    state.save(state.State(None, SEED.read_text(), {}, "active", None, 7))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    writer = os.open(fifo, os.O_RDWR)
    os.write(writer, b'INSTANCE "xlb" MASTER 250\n')

    def request(cmd, timeout=10.0, **args):
        if cmd == "ping":
            raise climod._KeepalivedStops          # keepalived's SIGTERM
        raise ctl.NotRunning()

    monkeypatch.setattr(ctl, "request", request)
    try:
        r = CliRunner().invoke(cli, ["ha", "follow", str(fifo)])
    finally:
        os.close(writer)
    assert r.exit_code == 0, r.output
    kept = state.load()
    assert (kept.role, kept.datapath) == ("backup", 7)
    assert "role backup not delivered: no xlb instance runs" in r.stderr
    assert "the next `xlb up` that adopts its data path starts as backup" in r.stderr


@pytest.mark.usefixtures("sigterm_kept")
def test_keepalived_stopping_twice_over_still_makes_xlb_backup(tmp_path, monkeypatch):
    """keepalived's stop reaches follow as more than one SIGTERM: `systemctl
    stop` signals every process of keepalived's unit at once, and keepalived
    its scripts' process group; keepalived killed (kill -9), its VRRP process
    ends follow's group and follow's parent dying signals it again. One that
    comes as follow tells xlb backup must not end it untold: the node would
    answer ARP for the VIPs beside the peer that takes over. Real signals,
    sent as xlb is asked."""
    from xlb import cli as climod, ctl
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    writer = os.open(fifo, os.O_RDWR)
    os.write(writer, b'INSTANCE "xlb" MASTER 250\n')
    told = []

    def request(cmd, timeout=10.0, **args):
        if cmd == "role":
            if args["role"] == "backup":
                os.kill(os.getpid(), signal.SIGTERM)      # systemd's, after keepalived's
            told.append((args["role"], args.get("stands", False)))
        elif told:
            os.kill(os.getpid(), signal.SIGTERM)          # keepalived stops
        return {"pid": 4242, "cut_off": []}

    monkeypatch.setattr(ctl, "request", request)
    monkeypatch.setattr(climod, "FOLLOW_POLL", 0.01)
    try:
        r = CliRunner().invoke(cli, ["ha", "follow", str(fifo)])
    finally:
        os.close(writer)
    assert r.exception is None and r.exit_code == 0, r.output
    # The stop's backup stands: keepalived kills follow a second later, and an
    # instance slower than that makes itself backup all the same. A role
    # keepalived says does not: a later one may have come meanwhile.
    assert told == [("active", False), ("backup", True)]


def lb1_links(monkeypatch):
    """This host's links as the lab pair's lb1 has them (the README's first
    node): its client link eth0 and eth1 on the servers' subnet."""
    from xlb import netif
    links = [netif.Link(index=i, name=name, mac=bytes([2, 0, 0, 0, 0, i]), up=True,
                        loopback=False, addresses=(IPv4Interface(address),))
             for i, (name, address) in enumerate((("eth0", "10.1.1.11/24"),
                                                   ("eth1", "10.1.11.11/24")), 2)]
    monkeypatch.setattr(netif, "links", lambda: links)


def test_no_flock_here_is_warned_of(monkeypatch):
    """keepalived disables the check that `xlb ha follow` runs when flock(1)
    is not there ("Disabling track script xlb_follows since not found"), in
    its log only: a follow killed alone would go unnoticed again."""
    lb1_links(monkeypatch)
    monkeypatch.setattr(ha, "FLOCK", "/nonexistent-xlb/flock")
    r = run(*KA, "--gateway", "10.1.11.1/24", str(SEED))
    assert r.exit_code == 0 and "/nonexistent-xlb/flock --shared" in r.stdout
    assert r.stderr == ("xlb: warning: no /nonexistent-xlb/flock here (util-linux): "
                        "keepalived would not check that `xlb ha follow` runs\n")


def test_a_file_in_a_directory_not_here_is_warned_of(monkeypatch):
    """keepalived makes its FIFO and track file, not their directory: it logs
    "Unable to create vrrp_notify fifo" and the node stays in FAULT."""
    lb1_links(monkeypatch)
    r = run(*KA, "--gateway", "10.1.11.1/24", "--fifo", "/nonexistent-xlb/k.fifo", str(SEED))
    assert r.exit_code == 0 and "vrrp_notify_fifo /nonexistent-xlb/k.fifo" in r.stdout
    assert r.stderr == ("xlb: warning: --fifo /nonexistent-xlb/k.fifo: no directory "
                        "/nonexistent-xlb here; keepalived does not make it, and would hold "
                        "the node in FAULT\n")


def test_a_link_that_would_not_work_is_warned_of(monkeypatch):
    """README's first node with the wrong --interface (eth0, its client link):
    keepalived sends and hears VRRP on eth0 only, the peer's adverts arrive
    on eth1, and both nodes become MASTER (both xlb answer ARP for the VIPs),
    the gateway on the client link, out of the backends' reach. A link that
    is not here has keepalived refuse the config ("Non-existent interface").
    Said on the node, as warnings: the config may be for another host."""
    lb1_links(monkeypatch)
    gw = ["--gateway", "10.1.11.1/24"]
    r = run("ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth0", *gw, str(SEED))
    assert r.exit_code == 0 and "    interface eth0\n" in r.stdout
    assert r.stderr.splitlines() == [
        "xlb: warning: --peer 10.1.11.12: on a subnet of eth1 here, not of --interface eth0, "
        "on which keepalived sends and hears VRRP: neither node would hear the other and both "
        "would become MASTER; give --interface eth1",
        "xlb: warning: --gateway 10.1.11.1/24: would be on eth0, but 10.1.11.0/24 is on eth1 "
        "here: the backends would not reach it; give 10.1.11.1/24@eth1"]
    r = run("ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eth0",
            "--gateway", "10.1.11.1/24@eth1", str(SEED))
    assert r.exit_code == 0 and r.stderr.startswith("xlb: warning: --peer 10.1.11.12: on a")
    assert r.stderr.count("\n") == 1
    r = run("ha", "keepalived", "--peer", "10.1.11.12", "--interface", "eht1", *gw,
            "--gateway", "10.1.12.1/24@eth2", str(SEED))
    assert r.exit_code == 0 and r.stderr.splitlines() == [
        "xlb: warning: --interface eht1: no such link here; keepalived here would refuse the "
        "config (Non-existent interface)",
        "xlb: warning: --gateway 10.1.12.1/24@eth2: no link eth2 here; keepalived here would "
        "refuse the config (Non-existent interface)"]
    # The README's commands: the first node's says nothing; the second's,
    # written on the first, warns of its peer only (the config is not for here).
    r = run(*KA, *gw, str(SEED))
    assert r.exit_code == 0 and r.stderr == ""
    r = run("ha", "keepalived", "--peer", "10.1.11.11", "--interface", "eth1", *gw, str(SEED))
    assert r.exit_code == 0 and r.stderr.count("\n") == 1 and "an address of this host" in r.stderr


def test_a_file_keepalived_would_write_over_is_refused(tmp_path, monkeypatch):
    """keepalived writes 1 over its track file when it starts (init_file ...
    overwrite) and its states into the FIFO's path, whatever is there: the
    xlb config given as either was lost (`xlb ha follow`, which refuses such
    a track file, runs only later). Refused, the file left as it was; a
    track file keepalived or follow wrote, and a FIFO, are taken."""
    lb1_links(monkeypatch)
    config = tmp_path / "xlb.toml"
    config.write_text(SEED.read_text())
    (tmp_path / "link").symlink_to(tmp_path / "serving")
    others_fifo = tmp_path / "others"
    os.mkfifo(others_fifo)
    os.chmod(others_fifo, 0o622)
    for option, path, why in (
            ("--track-file", config, "holds more than a track file's number: not overwritten"),
            ("--track-file", tmp_path / "link", "a symbolic link, which follow does not "
                                                "write through: give the file itself"),
            ("--track-file", tmp_path, "is a directory"),
            ("--fifo", config, "not a FIFO, which keepalived would write its states into"),
            # Taken as it is by keepalived: its writer would tell the role (follow
            # refuses it, but only once keepalived runs: the node stays in FAULT).
            ("--fifo", others_fifo, f"another user may write it (owner uid {os.geteuid()}, "
                                    f"mode 622): it would tell this node's role")):
        r = subprocess.run([str(ROOT / ".venv" / "bin" / "xlb"), *KA, "--gateway",
                            "10.1.11.1/24", option, str(path), str(config)],
                           capture_output=True, text=True)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
        assert r.stderr.startswith(f"xlb: error: {option}")
        assert config.read_text() == SEED.read_text()
    (tmp_path / "serving").write_text("1\n")
    os.mkfifo(tmp_path / "fifo", 0o600)
    r = run(*KA, "--gateway", "10.1.11.1/24", "--track-file", str(tmp_path / "serving"),
            "--fifo", str(tmp_path / "fifo"), str(config))
    assert r.exit_code == 0 and r.stderr == "", r.stderr


def test_a_router_on_no_link_of_the_node_is_warned_of(monkeypatch):
    """BIRD's eBGP session (single-hop) with a router on no link of the node's
    (its loopback address given, say) stays Idle for ever, and BIRD logs
    nothing: the VIPs are never announced. Said on the node, as a warning."""
    from xlb import netif
    node1 = [netif.Link(index=i, name=name, mac=bytes([2, 0, 0, 0, 1, i]), up=True,
                        loopback=False, addresses=(IPv4Interface(address),))
             for i, (name, address) in enumerate((("eth0", "10.1.2.11/24"),
                                                   ("eth1", "10.1.11.11/24")), 2)]
    monkeypatch.setattr(netif, "links", lambda: node1)
    r = run(*BIRD_ARGS)
    assert r.exit_code == 0 and r.stderr == ""
    r = run(*[("203.0.113.1" if a == "10.1.2.1" else a) for a in BIRD_ARGS])
    assert r.exit_code == 0 and "neighbor 203.0.113.1 as 65000;" in r.stdout
    assert r.stderr == ("xlb: warning: --router 203.0.113.1: on no subnet of this host's "
                        "links: BIRD's eBGP session (not multihop) would never come up; give "
                        "the router's address on a link it shares with this node\n")
