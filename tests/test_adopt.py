"""A new program built on a running one's maps (no network: the maps are
taken from a loaded program, as `xlb up` takes them from an attached one)."""

from __future__ import annotations

import ctypes as ct
import os
import shutil
import socket
import subprocess
import tempfile
from ipaddress import IPv4Address

import pytest

from xlb import bpfsys, layout
from xlb.planner import BackendState, ServiceState

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="loads XDP programs: needs root")]


VIP = IPv4Address("10.1.1.101")


def running_of(dp):
    from xlb.datapath import Running, maps_of
    info = bpfsys.prog_info(dp.prog_fd)
    return Running(info, {}, maps_of(info))


def map_ids(running) -> dict[str, int]:
    return {name: info.id for name, (_, info) in running.maps.items()}


def add_flows(dp, n: int) -> None:
    flows = dp._maps["flows"]
    for i in range(n):
        key = flows.Key()
        key.saddr = i + 1
        flows[key] = flows.Leaf()


def test_a_new_program_keeps_every_running_map():
    from xlb.datapath import Datapath
    old = Datapath()
    try:
        old.set_backend(3, IPv4Address("10.1.11.101"), 8080)
        old.write_ring(1, [3, 3])
        old.set_timeouts(0, 1, 2, 3, 4)
        old.set_service(VIP, 80, 6, 0, 1, 2)
        old.write_maglev(3, [3] * 7)
        old.set_timeouts(1, 5, 6, 7, 8)
        old.set_service(VIP, 81, 17, 1, 3, 7, layout.SERVICE_MAGLEV | layout.SERVICE_ADOPT)
        old.write_maglev(4, [3] * 7)
        old.set_timeouts(2, 5, 6, 7, 8)
        old.set_service(VIP, 82, 6, 2, 4, 7, layout.SERVICE_MAGLEV | layout.SERVICE_SOURCE)
        old.set_timeouts(5, 9, 9, 9, 9)         # a removed frontend's: its id is retired
        add_flows(old, 5)
        running = running_of(old)
        before = map_ids(running)
        new = Datapath(running=running)
    finally:
        old.close()
    try:
        assert new.fresh_maps == []
        assert all(new.kept(name) for name in layout.MAPS)
        after = running_of(new)
        assert map_ids(after) == before and set(before) == set(layout.MAPS)
        after.close()
        held, backends = new.held()
        assert backends == {3: BackendState(3, IPv4Address("10.1.11.101"), 8080)}
        assert held.services == {(VIP, 80, 6): ServiceState(0, 1, (3, 3), False, (1, 2, 3, 4)),
                            (VIP, 81, 17): ServiceState(1, 3, (3,) * 7, True, (5, 6, 7, 8),
                                                        adopt=True),
                            (VIP, 82, 6): ServiceState(2, 4, (3,) * 7, True, (5, 6, 7, 8),
                                                       source=True)}
        assert held.retired_services == {5}
        assert new.flow_entries() == 5
    finally:
        new.close()


def test_a_map_that_changed_size_is_copied_and_the_rest_kept():
    from xlb.datapath import Datapath, Limits
    old = Datapath(Limits(max_flows=1024))
    try:
        add_flows(old, 7)
        running = running_of(old)
        before = map_ids(running)
        new = Datapath(Limits(max_flows=2048), running)
    finally:
        old.close()
    try:
        assert new.fresh_maps == ["flows (copied: 1024 -> 2048 entries)"]
        assert new.kept("flows")
        after = running_of(new)
        ids = map_ids(after)
        after.close()
        assert ids["flows"] != before["flows"]
        assert {k: v for k, v in ids.items() if k != "flows"} == \
            {k: v for k, v in before.items() if k != "flows"}
        assert new.flow_entries() == 7
        assert new._maps["flows"].max_entries == 2048
    finally:
        new.close()


def set_flow(dp, saddr: int, seen: int, backend_id: int = 1) -> None:
    flows = dp._maps["flows"]
    key, value = flows.Key(), flows.Leaf()
    key.saddr, value.seen, value.backend_id = saddr, seen, backend_id
    flows[key] = value


def flows_by_source(dp) -> dict[int, tuple[int, int]]:
    return {k.saddr: (v.seen, v.backend_id) for k, v in dp._maps["flows"].items()}


def let_go(old, new, running) -> None:
    """Detaches and closes a Datapath (old) and the one that adopted it (new,
    None if it failed), and the running maps found in between (new closes them)."""
    for dp in (new, old):
        if dp is not None:
            dp.detach_all()
            dp.close()
    if new is None and running is not None:
        running.close()


def test_a_resized_flow_table_takes_what_the_running_program_wrote_until_the_swap(fibnet):
    """The copy is made at the compile; the running program serves on its own
    table until the swap, and what it wrote there meanwhile (a connection
    opened, one that went on) must be in the new table once the new program
    serves: this one would balance such a connection anew (a TCP reset). What
    the new program wrote since the swap is newer, and stays."""
    from xlb.datapath import Datapath, Limits, find_running
    old = Datapath(Limits(max_flows=1024))
    new = running = None
    try:
        old.attach(fibnet.ifindex["ext"], "ext")
        for saddr in (1, 2, 3):
            set_flow(old, saddr, seen=10)
        running = find_running()
        new = Datapath(Limits(max_flows=2048), running)
        assert new.fresh_maps == ["flows (copied: 1024 -> 2048 entries)"]
        set_flow(old, 1, seen=30, backend_id=9)     # the running program, after the copy
        set_flow(old, 2, seen=20)
        set_flow(old, 4, seen=20)
        set_flow(new, 2, seen=40, backend_id=7)     # as if the new one wrote it first
        new.attach(fibnet.ifindex["ext"], "ext")
        assert flows_by_source(new) == {1: (30, 9), 2: (40, 7), 3: (10, 1), 4: (20, 1)}
    finally:
        let_go(old, new, running)


def test_a_resized_flow_table_is_read_before_and_after_the_swaps_not_between(fibnet,
                                                                              monkeypatch):
    """Between the swaps on two interfaces, one runs the new program on its
    tables and the other the running one on its own: a connection opened
    through one is answered through the other, which does not know it (its
    replies leave un-NATed), and so it stays if the process dies there. The
    swaps go one right after the other, the tables read before them (what
    the running program wrote since the copy) and after (what it wrote until
    the last swap), not between: a catch-up after each swap held the
    interfaces apart for as long as reading both tables takes."""
    from xlb import datapath
    from xlb.datapath import Datapath, Limits, find_running
    old = Datapath(Limits(max_flows=1024))
    new = running = None
    events = []
    dump, xdp_set = datapath._dump, datapath.netif.xdp_set

    def reading(*args):
        events.append("read")
        return dump(*args)

    def swapping(*args, **kw):
        xdp_set(*args, **kw)
        events.append("swap")
        set_flow(old, len(events), seen=10)   # the running program, on the other interface

    try:
        for link in ("ext", "int"):
            old.attach(fibnet.ifindex[link], link)
        running = find_running()
        new = Datapath(Limits(max_flows=2048), running)
        monkeypatch.setattr(datapath, "_dump", reading)
        monkeypatch.setattr(datapath.netif, "xdp_set", swapping)
        for link in ("ext", "int"):
            new.attach(fibnet.ifindex[link], link)
        new.swapped()
        monkeypatch.undo()
        first, last = events.index("swap"), len(events) - 1 - events[::-1].index("swap")
        assert events[first:last + 1] == ["swap", "swap"]
        assert set(flows_by_source(new)) >= {first + 1, last + 1}
    finally:
        monkeypatch.undo()
        let_go(old, new, running)


def set_connection(dp, sport: int, state: str, seen: int) -> set[tuple[int, int, int]]:
    """Both entries of a connection from client port sport, as the program
    writes them; returns their keys' addresses and ports (saddr, sport, dport)."""
    flows = dp._maps["flows"]
    keys = set()
    for direction, ends, peer in ((layout.FLOW_FORWARD, (1, 2, sport, 80), (3, 8080)),
                                  (layout.FLOW_REPLY, (3, 1, 8080, sport), (2, 80))):
        key, value = flows.Key(), flows.Leaf()
        key.saddr, key.daddr, key.sport, key.dport = ends
        key.proto = 6
        value.addr, value.port = peer
        value.dir, value.state, value.timeout, value.seen = \
            direction, layout.FLOW_STATES[state], 900, seen
        flows[key] = value
        keys.add((key.saddr, key.sport, key.dport))
    return keys


def test_a_smaller_flow_table_keeps_the_open_connections(fibnet):
    """A flow table made smaller than what the running one holds takes whole
    connections, the open ones first, and its catch-up after the swap brings
    back none of those that did not fit: copied in hash order, then caught
    up with everything it lacked, it lost open connections (reset) to
    closing ones, more recent here."""
    from xlb.datapath import Datapath, Limits, find_running
    old = Datapath(Limits(max_flows=1024))
    new = running = None
    try:
        old.attach(fibnet.ifindex["ext"], "ext")
        opened = set().union(*(set_connection(old, sport, "established", seen=1000 + sport)
                               for sport in range(1000, 1020)))
        for sport in range(2000, 2100):
            set_connection(old, sport, "closing", seen=10_000 + sport)
        running = find_running()
        new = Datapath(Limits(max_flows=128), running)
        assert new.fresh_maps == ["flows (copied: 1024 -> 128 entries; 56 connections did not fit)"]
        new.attach(fibnet.ifindex["ext"], "ext")
        held = {(k.saddr, k.sport, k.dport) for k in new._maps["flows"].keys()}
        assert opened <= held and len(held) <= 128
    finally:
        let_go(old, new, running)


def adopt_older_build(tmp_path, file: str, old_text: str, new_text: str, fill=None):
    """A Datapath adopting the maps of a build whose bpf/`file` has new_text
    for old_text, which fill(its BPF) writes first; returns it and the older
    build's map ids."""
    from bcc import BPF
    from xlb.datapath import PROG_NAME, Datapath, Limits, Running, defines, maps_of
    src = tmp_path / "bpf"
    shutil.copytree(layout.BPF_DIR, src)
    source = src / file
    text = source.read_text()
    assert text.count(old_text) == 1
    source.write_text(text.replace(old_text, new_text))
    old = BPF(src_file=str(src / "xlb.c").encode(),
              cflags=[f"-I{src}", "-w", *defines(Limits())])
    try:
        info = bpfsys.prog_info(old.load_func(PROG_NAME.encode(), BPF.XDP).fd)
        if fill is not None:
            fill(old)
        running = Running(info, {}, maps_of(info))
        before = map_ids(running)
        return Datapath(running=running), before
    finally:
        old.cleanup()


def test_a_program_without_control_stats_is_adopted_and_counts_from_zero(tmp_path):
    """An upgrade from a build before control_stats (its control process kept
    those counts in memory): every map it has is kept, control_stats is new,
    at zero, and the next adoption finds it."""
    new, before = adopt_older_build(
        tmp_path, "xlb.c", "BPF_ARRAY(control_stats, struct control_counters, 1);\n", "")
    try:
        assert new.fresh_maps == [] and set(before) == set(layout.MAPS) - {"control_stats"}
        assert new.kept("config") and not new.kept("control_stats")
        after = running_of(new)
        ids = map_ids(after)
        after.close()
        assert {k: v for k, v in ids.items() if k != "control_stats"} == before
        assert set(ids) == set(layout.MAPS)
        assert bytes(new.control_counters()) == bytes(layout.ControlCounters())
    finally:
        new.close()


def test_a_map_whose_layout_changed_starts_empty_and_the_rest_is_kept(tmp_path):
    """What it held is lost: `xlb up` must not take its defaults (the config's
    forwarding flag) for the running data path's."""
    new, before = adopt_older_build(tmp_path, "xlb_shared.h", "\t__u32 pad;\n\t__u64 vip_bits",
                                    "\t__u32 pad;\n\t__u64 older;\n\t__u64 vip_bits")
    try:
        assert new.fresh_maps == ["config (emptied: its layout changed)"]
        assert not new.kept("config")
        # control_stats only when bound to the program, as Datapath does.
        kept = set(layout.MAPS) - {"config", "control_stats"}
        assert set(before) == kept | {"config"}
        assert all(new.kept(name) for name in kept)
        after = running_of(new)
        ids = map_ids(after)
        after.close()
        assert ids["config"] != before["config"]
        assert {k: ids[k] for k in kept} == {k: before[k] for k in kept}
    finally:
        new.close()


WAS1, GONE, CLIENT = (IPv4Address(a) for a in ("10.1.11.101", "10.1.11.109", "10.1.1.10"))


def serving(old) -> None:
    """What an older build's maps hold (written as its tables have them): VIP
    port 80 over WAS1 (backend 5, as after some applies), a connection to it
    from client port 40002, and one from 40000 to a server removed since
    (GONE, backend 7), which goes on (on_server_down "keep")."""
    from xlb.datapath import _be16, _be32, _set_bit, _set_endpoint_bit
    old[b"vips"][ct.c_uint32(_be32(VIP))] = ct.c_uint32(1)
    config = old[b"config"][ct.c_int(0)]
    _set_bit(config.vip_bits, _be32(VIP))
    for server in (WAS1, GONE):
        _set_endpoint_bit(config.backend_bits, _be32(server), _be16(8080))
    old[b"config"][ct.c_int(0)] = config
    old[b"backends"][ct.c_int(5)] = old[b"backends"].Leaf(_be32(WAS1), _be16(8080), 0)
    old[b"backends"][ct.c_int(7)] = old[b"backends"].Leaf(_be32(GONE), _be16(8080),
                                                          layout.BACKEND_NO_NEW_FLOWS)
    old[b"rings"][ct.c_int(0)] = ct.c_uint32(5)
    services = old[b"services"]
    services[services.Key(_be32(VIP), _be16(80), 6)] = services.Leaf(0, 0, 1, 0)
    flows = old[b"flows"]
    for server, backend_id, sport in ((GONE, 7, 40000), (WAS1, 5, 40002)):
        for key, to, direction in (((CLIENT, VIP, sport, 80), (server, 8080), layout.FLOW_FORWARD),
                                   ((server, CLIENT, 8080, sport), (VIP, 80), layout.FLOW_REPLY)):
            k, v = flows.Key(), flows.Leaf()
            k.saddr, k.daddr = _be32(key[0]), _be32(key[1])
            k.sport, k.dport = _be16(key[2]), _be16(key[3])
            k.proto = 6
            v.addr, v.port, v.dir, v.backend_id = _be32(to[0]), _be16(to[1]), direction, backend_id
            v.state = layout.FLOW_STATES["established"]
            flows[k] = v


def test_an_emptied_config_map_filters_the_kept_vips_and_servers(tmp_path):
    """Beside the forwarding flag, the config map holds the bit sets that let
    a packet neither to a VIP nor from a server leave at once: the control
    plane sets a bit as it writes a VIP or a server, and an adoption writes
    none that it finds there already. An upgrade whose config map was emptied
    (its layout changed) passed every packet of the VIPs, and the servers'
    replies, as none of the balancer's: the service ended."""
    from packets import tcp_frame
    new, _ = adopt_older_build(tmp_path, "xlb_shared.h", "\t__u32 pad;\n\t__u64 vip_bits",
                               "\t__u32 pad;\n\t__u64 older;\n\t__u64 vip_bits", serving)
    try:
        assert new.fresh_maps == ["config (emptied: its layout changed)"]
        syn = new.test_run(tcp_frame(CLIENT, VIP, 40001, 80))
        assert syn.data == tcp_frame(CLIENT, WAS1, 40001, 8080)
        reply = new.test_run(tcp_frame(GONE, CLIENT, 8080, 40000, flags="A"))
        assert reply.data == tcp_frame(VIP, CLIENT, 80, 40000, flags="A")
    finally:
        new.close()


def test_an_emptied_backends_map_keeps_the_ids_that_the_connections_name(tmp_path):
    """The flows name their server by backend id, and so do the counters: an
    adoption reads the ids back from the backends map. Emptied (its layout
    changed), it gave its servers new ids, which the connections' ids then
    named: a server's maint ended another's connections and left its own
    going, and each server showed another's counters and active flows. The
    connections' forward entries tell each id's address and port."""
    from packets import tcp_frame
    from xlb.balancer import Balancer
    from xlb.model import from_flags
    new, _ = adopt_older_build(tmp_path, "xlb_shared.h", "\t__be16 port;\n\t__u16 flags;\n};",
                               "\t__be16 port;\n\t__u16 flags;\n\t__u32 older;\n};", serving)
    try:
        assert new.fresh_maps == ["backends (emptied: its layout changed)"]
        config = from_flags([f"{VIP}:80"], [f"{WAS1}:8080", "10.1.11.102:8080"])
        balancer = Balancer(new)
        balancer.adopt(config)
        balancer.apply(config, relink=False)
        assert balancer.state.backends[("default", "backend1")].id == 5
        assert balancer.state.retired_backends == {7: (GONE, 8080)}
        to = {new.test_run(tcp_frame(CLIENT, VIP, sport, 80)).data[30:34] for sport in range(9)}
        assert to == {WAS1.packed, IPv4Address("10.1.11.102").packed}
        assert balancer.set_admin("disable", "default", "backend1")["flows_ended"] >= 1
        left = {socket.ntohs(k.sport) for k in new._maps["flows"].keys()
                if k.daddr == int.from_bytes(VIP.packed, "little")}
        assert 40000 in left and 40002 not in left     # GONE's goes on (keep)
        # GONE takes no new flows: a SYN on its connection's port is balanced anew.
        assert new.test_run(tcp_frame(CLIENT, VIP, 40000, 80)).data[30:34] != GONE.packed
    finally:
        new.close()


def test_the_private_bpffs_makes_no_directory():
    """Compiling onto a running program pins its maps in a bpffs of the
    process's own: mounted where a directory exists already, so that a process
    killed meanwhile leaves none behind (and the host's bpffs is not touched)."""
    tmp = tempfile.gettempdir()
    before, host = set(os.listdir(tmp)), os.stat(bpfsys.PRIVATE_BPFFS).st_dev
    with bpfsys.private_bpffs() as path:
        made = set(os.listdir(tmp)) - before
        kind = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True,
                              check=True).stdout.strip()
        own = os.stat(path).st_dev != host
    assert (made, kind, own) == (set(), "bpf_fs", True)
    assert os.stat(bpfsys.PRIVATE_BPFFS).st_dev == host
