"""From config to map writes: ids, rings, ARP placement and the order of writes."""

import gc
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from xlb import layout, maglev, planner
from xlb.model import Config, Frontend, Pool, Server, from_flags

LIMITS = dict(max_services=8, max_backends=16, ring_size=32, max_maglev=2)
A = IPv4Address


@dataclass(frozen=True)
class FakeLink:
    index: int
    name: str
    mac: bytes
    net: IPv4Network

    def holds(self, addr):
        return addr in self.net


LINKS = [FakeLink(2, "eth0", b"\x02" * 6, IPv4Network("10.1.1.0/24")),
         FakeLink(3, "eth1", b"\x03" * 6, IPv4Network("10.1.11.0/24"))]
SEED = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080", "10.1.11.102:8080"])


def desired(cfg, previous=planner.DataplaneState(), states={}):
    return planner.desired(cfg, LINKS, previous, **LIMITS, states=states)


def test_seed_state():
    st = desired(SEED)
    svc = st.services[(A("10.1.1.101"), 80, 6)]
    assert (svc.id, svc.ring, svc.slots) == (0, 0, (0, 1))
    assert {k: (b.id, str(b.address), b.port) for k, b in st.backends.items()} == {
        ("default", "backend1"): (0, "10.1.11.101", 8080),
        ("default", "backend2"): (1, "10.1.11.102", 8080)}
    # ARP is answered only on the link whose subnet holds the VIP.
    assert st.arp == {(2, A("10.1.1.101")): b"\x02" * 6}
    assert st.vips == {A("10.1.1.101")}


def test_first_plan_writes_the_service_last():
    ops = planner.plan(planner.DataplaneState(), desired(SEED))
    names = [op[0] for op in ops]
    assert names == ["set_backend", "set_backend", "write_ring", "set_vip", "set_arp",
                     "set_owner", "set_owner", "set_timeouts", "set_service"]
    assert ops[-2:] == [("set_timeouts", 0, 60, 900, 120, 300),
                        ("set_service", A("10.1.1.101"), 80, 6, 0, 0, 2, 0)]


def test_same_config_plans_nothing():
    st = desired(SEED)
    assert planner.plan(st, desired(SEED, st)) == []


@pytest.mark.parametrize("health,closes", [("up", True), ("down", False)])
def test_a_removed_server_is_closed_once(health, closes):
    """A removed server's entry stays, closed to new flows: written closed
    if it took new flows, and not written again if it took none already."""
    cur = desired(SEED, states={("default", "backend2"): health})
    ops = planner.plan(cur, desired(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"]), cur))
    assert [op for op in ops if op[:2] == ("set_backend", 1)] == \
        ([("set_backend", 1, A("10.1.11.102"), 8080, True)] if closes else [])


def test_changed_backends_go_to_the_other_ring_before_the_switch():
    st = desired(SEED)
    cfg = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080", "10.1.11.102:8080",
                                         "10.1.11.103:8080"])
    new = desired(cfg, st)
    svc = new.services[(A("10.1.1.101"), 80, 6)]
    assert svc.ring == 1                      # beside ring 0, which is in use
    # kept servers keep their ids; the new one takes an id the old state did not use
    assert [new.backends[("default", f"backend{i}")].id for i in (1, 2, 3)] == [0, 1, 2]
    ops = planner.plan(st, new)
    names = [op[0] for op in ops]
    assert names.index("write_ring") < names.index("set_service")
    assert ("write_ring", 1, [0, 1, 2]) in ops
    assert ("set_backend", 2, A("10.1.11.103"), 8080, False) in ops


def test_new_ids_avoid_ids_just_released():
    three = from_flags(["10.1.1.101:80"], ["10.1.11.1:80", "10.1.11.2:80", "10.1.11.3:80"])
    st = desired(three)
    cfg = Config(frontends=three.frontends,
                 pools=(Pool("default", (three.pools[0].servers[0],
                                         Server("new", A("10.1.11.9"), 80))),))
    new = desired(cfg, st)
    assert new.backends[("default", "backend1")].id == 0
    assert new.backends[("default", "new")].id == 3      # not 1 or 2, just released


def test_new_ids_avoid_ids_retired_by_earlier_changes():
    """A server or frontend removed by one change, and one added by a later
    change: the newcomer's id is not the removed one's, whose counters (and
    flows, kept) still name it. Only when no id is left that was never used
    is a retired one taken."""
    www, www2, www3 = (Frontend(n, A("10.1.1.101"), port, "tcp", "p")
                       for n, port in (("www", 80), ("www2", 81), ("www3", 82)))
    s3 = Server("s3", A("10.1.11.3"), 80)
    steps = [Config(frontends=(www, www2), pools=(Pool("p", (S1, S2)),)),
             Config(frontends=(www,), pools=(Pool("p", (S1,)),)),
             Config(frontends=(www, www3), pools=(Pool("p", (S1, s3)),))]
    st = planner.DataplaneState()
    for cfg in steps:
        st = desired(cfg, st)
    assert {k[1]: b.id for k, b in st.backends.items()} == {"s1": 0, "s3": 2}
    assert {k[1]: s.id for k, s in st.services.items()} == {80: 0, 82: 2}
    assert (st.retired_backends.keys(), st.retired_services) == ({1}, {1})

    # All 16 ids used: the next newcomer takes a retired one, and a 17th is refused.
    many = [Server(f"m{i}", A(f"10.1.12.{i}"), 80) for i in range(14)]
    full = desired(Config(frontends=(www,), pools=(Pool("p", (S1, s3, *many)),)), st)
    assert sorted(b.id for b in full.backends.values()) == list(range(16))
    assert full.retired_backends.keys() == frozenset()
    with pytest.raises(planner.CapacityError, match="more backends"):
        desired(Config(frontends=(www,), pools=(Pool("p", (S1, S2, s3, *many)),)), full)


def test_an_id_taken_again_starts_its_counters_at_zero():
    """A newcomer that takes a retired id (no unused one is left) has that id's
    counters cleared before its entry is written: they hold the removed
    server's or frontend's traffic. An id kept by its own keeps its counters."""
    www, www2, www3 = (Frontend(n, A("10.1.1.101"), port, "tcp", "p")
                       for n, port in (("www", 80), ("www2", 81), ("www3", 82)))
    s3 = Server("s3", A("10.1.11.3"), 80)
    limits = dict(LIMITS, max_services=2, max_backends=2)
    old = planner.desired(Config(frontends=(www, www2), pools=(Pool("p", (S1, S2)),)), LINKS,
                          planner.DataplaneState(), **limits)
    new = planner.desired(Config(frontends=(www, www3), pools=(Pool("p", (S1, s3)),)), LINKS,
                          old, **limits)
    assert new.backends[("p", "s3")].id == old.backends[("p", "s2")].id == 1
    assert new.services[(A("10.1.1.101"), 82, 6)].id == 1
    ops = planner.plan(old, new)
    clears = [op for op in ops if op[0].startswith("clear_")]
    assert clears == [("clear_backend_counters", 1), ("clear_service_counters", 1)]
    assert ops.index(("clear_backend_counters", 1)) < ops.index(
        ("set_backend", 1, A("10.1.11.3"), 80, False))
    assert ops.index(("clear_service_counters", 1)) < next(
        i for i, op in enumerate(ops) if op[:4] == ("set_service", A("10.1.1.101"), 82, 6))

    # Removed by one change, their ids taken by the next: cleared as well.
    mid = planner.desired(Config(frontends=(www,), pools=(Pool("p", (S1,)),)), LINKS, old,
                          **limits)
    later = planner.desired(Config(frontends=(www, www3), pools=(Pool("p", (S1, s3)),)), LINKS,
                            mid, **limits)
    assert [op for op in planner.plan(mid, later) if op[0].startswith("clear_")] == \
        [("clear_backend_counters", 1), ("clear_service_counters", 1)]


def test_a_retired_id_is_taken_before_one_this_change_releases():
    www = Frontend("www", A("10.1.1.101"), 80, "tcp", "p")
    s3, s4 = Server("s3", A("10.1.11.3"), 80), Server("s4", A("10.1.11.4"), 80)
    st = planner.DataplaneState()
    for servers in ((S1, S2, s3), (S1, s3), (S1, s4)):
        st = planner.desired(Config(frontends=(www,), pools=(Pool("p", servers),)), LINKS, st,
                             **dict(LIMITS, max_backends=3))
    assert st.backends[("p", "s4")].id == 1     # s2's, retired a change ago, not s3's
    assert st.retired_backends.keys() == {2}


def _pool(*servers, algorithm="roundrobin", on_server_down="keep"):
    return Config(frontends=(Frontend("www", A("10.1.1.101"), 80, "tcp", "p"),),
                  pools=(Pool("p", tuple(servers), algorithm, on_server_down=on_server_down),))


def _slots(cfg, states):
    return desired(cfg, states=states).services[(A("10.1.1.101"), 80, 6)].slots


S1, S2 = Server("s1", A("10.1.11.1"), 80), Server("s2", A("10.1.11.2"), 80)
B1 = Server("b1", A("10.1.11.3"), 80, backup=True)


def test_only_servers_that_are_up_take_new_flows():
    cfg = _pool(S1, S2, B1)
    assert _slots(cfg, {}) == (0, 1)                               # backup idle
    for state in ("down", "drain", "maint"):
        assert _slots(cfg, {("p", "s1"): state}) == (1,)


def test_backups_serve_only_while_no_primary_is_up():
    cfg = _pool(S1, S2, B1)
    both_out = {("p", "s1"): "maint", ("p", "s2"): "down"}
    assert _slots(cfg, both_out) == (2,)
    assert _slots(cfg, {**both_out, ("p", "b1"): "down"}) == ()    # nothing: drop new flows


def test_weighted_pool_ring():
    cfg = _pool(Server("a", A("10.1.11.1"), 80, weight=3), Server("b", A("10.1.11.2"), 80),
                algorithm="weighted")
    assert sorted(_slots(cfg, {})) == [0, 0, 0, 1]


def test_server_state_precedence():
    s = Server("s", A("10.1.11.1"), 80)
    assert planner.server_state(s, None, "up") == "up"
    assert planner.server_state(s, None, "down") == "down"
    assert planner.server_state(s, "drain", "up") == "drain"
    assert planner.server_state(s, "drain", "down") == "down"
    assert planner.server_state(s, "maint", "up") == "maint"
    assert planner.server_state(Server("s", A("10.1.11.1"), 80, enabled=False),
                                None, "up") == "maint"


@pytest.mark.parametrize("policy,ended", [("reset", True), ("keep", False)])
def test_a_drained_server_that_fails_its_checks_follows_on_server_down(policy, ended):
    """Drain keeps established flows on a server that can serve them; once its
    checks fail they follow the pool's policy, as any down server's do, not
    only when it is enabled again."""
    cfg = _pool(S1, S2, on_server_down=policy)
    key = ("p", "s1")
    drained = {key: planner.server_state(S1, "drain", "up")}
    dead = {key: planner.server_state(S1, "drain", "down")}
    cur = desired(cfg, states=drained)
    tgt = desired(cfg, cur, dead)
    assert planner.flows_to_end(cfg, drained, cur, cfg, dead, tgt, {}).backend_ids == \
        ({0} if ended else set())
    back = {key: planner.server_state(S1, "drain", "up")}     # recovered: drained still
    assert planner.flows_to_end(cfg, dead, tgt, cfg, back, desired(cfg, tgt, back), {}) \
        .backend_ids == set()


@pytest.mark.parametrize("policy,before,after,ended", [
    ("keep", "up", "drain", False),      # drain keeps established flows
    ("keep", "up", "maint", True),       # disable ends them
    ("reset", "up", "maint", True),
    ("keep", "up", "down", False),
    ("reset", "up", "down", True),
    ("reset", "drain", "down", True),
    ("reset", "maint", "down", False),   # already ended when it went to maint
    ("keep", "maint", "up", False),
    ("reset", "maint", "maint", False),  # no change, nothing to end
    ("reset", "down", "down", False),
])
def test_flows_to_end_by_state_change(policy, before, after, ended):
    cfg = _pool(S1, S2, on_server_down=policy)
    old_states, new_states = {("p", "s1"): before}, {("p", "s1"): after}
    cur = desired(cfg, states=old_states)
    tgt = desired(cfg, cur, new_states)
    ends = planner.flows_to_end(cfg, old_states, cur, cfg, new_states, tgt, {})
    assert ends.backend_ids == ({0} if ended else set())
    assert ends.service_ids == set()


@pytest.mark.parametrize("policy,ended", [("keep", set()), ("reset", {0})])
def test_flows_of_a_removed_server_follow_the_policy(policy, ended):
    old, new = _pool(S1, S2, on_server_down=policy), _pool(S2, on_server_down=policy)
    cur = desired(old)
    tgt = desired(new, cur)
    assert planner.flows_to_end(old, {}, cur, new, {}, tgt, {}).backend_ids == ended


def test_a_pool_switched_to_reset_ends_the_flows_keep_kept():
    """Under "keep", a server down (its checks failing) and a removed one keep
    their flows; an apply that switches the pool to "reset" ends them, as the
    new policy would have when they went: the down one's by its id, the
    removed one's (its id retired) through the pool's frontend."""
    down = {("p", "s2"): "down"}
    kept = _pool(S1, S2, on_server_down="keep")
    cur = desired(kept, desired(_pool(S1, S2, B1)), down)      # b1 removed
    assert cur.retired_backends.keys() == {2}
    assert planner.flows_to_end(kept, down, cur, kept, down, desired(kept, cur, down), {}) \
        == planner.FlowsToEnd(frozenset(), frozenset())
    reset = _pool(S1, S2, on_server_down="reset")
    ends = planner.flows_to_end(kept, down, cur, reset, down, desired(reset, cur, down), {})
    assert ends == planner.FlowsToEnd(frozenset({1}), frozenset(), ({2}, {0}))


@pytest.mark.parametrize("policy,ended", [("keep", set()), ("reset", {1})])
@pytest.mark.parametrize("moved", [A("10.1.11.3"), 81], ids=["address", "port"])
def test_a_server_given_another_address_or_port_is_a_new_server(policy, ended, moved):
    """Its old id, which its flows to the old address name, is retired, and
    its flows follow the pool's policy as a removed server's do; at the new
    address it takes an id never used."""
    old = _pool(S1, S2, on_server_down=policy)
    s2 = replace(S2, address=moved) if isinstance(moved, A) else replace(S2, port=moved)
    new = _pool(S1, s2, on_server_down=policy)
    cur = desired(old)
    tgt = desired(new, cur)
    assert {k[1]: b.id for k, b in tgt.backends.items()} == {"s1": 0, "s2": 2}
    assert tgt.retired_backends.keys() == {1}
    assert planner.flows_to_end(old, {}, cur, new, {}, tgt, {}).backend_ids == ended
    ops = planner.plan(cur, tgt)
    assert ("set_backend", 1, S2.address, S2.port, True) in ops      # closed to new flows
    assert ("set_backend", 2, s2.address, s2.port, False) in ops


def _renamed(old, new, new_states={}):
    """The target of applying `new` over `old` (as Balancer.apply does), and
    the flows that ends."""
    cur = desired(old)
    renamed = planner.renames(old, cur, new)
    tgt = planner.desired(new, LINKS, cur, **LIMITS, states=new_states, renamed=renamed)
    return cur, tgt, planner.flows_to_end(old, {}, cur, new, new_states, tgt, renamed)


@pytest.mark.parametrize("policy", ["reset", "keep"])
@pytest.mark.parametrize("server,pool", [("s-1", "p"), ("s1", "web"), ("s-1", "web")])
def test_a_renamed_server_is_the_same_server(policy, server, pool):
    """Renamed, in a renamed pool (serving the same frontend), or both: at the
    same address and port it keeps its id, so its flows go on whatever the
    policy, and nothing is written."""
    old = _pool(S1, S2, on_server_down=policy)
    new = Config(frontends=(replace(old.frontends[0], pool=pool),),
                 pools=(replace(old.pools[0], name=pool,
                                servers=(replace(S1, name=server), S2)),))
    cur, tgt, ends = _renamed(old, new)
    assert {k: b.id for k, b in tgt.backends.items()} == {(pool, server): 0, (pool, "s2"): 1}
    assert tgt.retired_backends.keys() == set()
    assert ends == planner.FlowsToEnd(frozenset(), frozenset())
    assert planner.plan(cur, tgt) == []


def test_a_server_renamed_in_its_pool_is_the_same_server_whatever_the_pool_serves_now():
    """The pool keeps its name and serves another VIP from this change on: a
    server renamed in it at its address and port keeps its id all the same."""
    old = _pool(S1, S2, on_server_down="reset")
    new = Config(frontends=(replace(old.frontends[0], vip=A("10.1.1.102")),),
                 pools=(replace(old.pools[0], servers=(replace(S1, name="s-1"), S2)),))
    cur, tgt, ends = _renamed(old, new)
    assert {k[1]: b.id for k, b in tgt.backends.items()} == {"s-1": 0, "s2": 1}
    assert ends.backend_ids == set()


def test_names_swapped_stay_with_the_addresses():
    """s1 and s2 trade addresses (or s1 takes a new one and another name its
    old one): ids follow the addresses, whose flows go on; a new address is a
    new server."""
    old = _pool(S1, S2, on_server_down="reset")
    swapped = _pool(replace(S1, address=S2.address), replace(S2, address=S1.address),
                    on_server_down="reset")
    cur, tgt, ends = _renamed(old, swapped)
    assert {k[1]: b.id for k, b in tgt.backends.items()} == {"s1": 1, "s2": 0}
    assert ends.backend_ids == set()
    # The ring, in the pool's order of names, is written anew; no backend is.
    assert {op[0] for op in planner.plan(cur, tgt)} == {"write_ring", "set_service"}
    moved = _pool(replace(S1, address=A("10.1.11.9")), replace(S1, name="t"), S2,
                  on_server_down="reset")
    cur, tgt, ends = _renamed(old, moved)
    assert {k[1]: b.id for k, b in tgt.backends.items()} == {"s1": 2, "t": 0, "s2": 1}
    assert ends.backend_ids == set()


def test_a_drain_goes_with_its_server_when_two_swap_names():
    """s1 and s2 trade names at their addresses: s1's drain goes with its
    server, now s2, though s1 is a name the change keeps."""
    old = _pool(S1, S2)
    swapped = _pool(replace(S2, name="s1"), replace(S1, name="s2"))
    renamed = planner.renames(old, desired(old), swapped)
    assert renamed == {("p", "s1"): ("p", "s2"), ("p", "s2"): ("p", "s1")}
    assert planner.carried({("p", "s1"): "drain"}, renamed, {("p", "s1"), ("p", "s2")}) == \
        {("p", "s1"): ("p", "s2")}


def test_an_address_moved_to_a_pool_of_another_frontend_is_a_new_server():
    """The same address and port, in a pool that serves none of the frontends
    its old pool served: a new server, and gone from its old pool, whose
    policy ends its flows."""
    old = _pool(S1, S2, on_server_down="reset")
    new = Config(frontends=(*old.frontends, Frontend("alt", A("10.1.1.102"), 80, "tcp", "q")),
                 pools=(replace(old.pools[0], servers=(S2,)),
                        Pool("q", (replace(S1, name="t"),))))
    cur, tgt, ends = _renamed(old, new)
    assert {k: b.id for k, b in tgt.backends.items()} == {("p", "s2"): 1, ("q", "t"): 2}
    assert tgt.retired_backends.keys() == {0}
    assert ends.backend_ids == {0}
    # Every id used: the newcomer takes s1's id, and is no less a new server.
    limits = dict(LIMITS, max_backends=2)
    cur = planner.desired(old, LINKS, planner.DataplaneState(), **limits)
    renamed = planner.renames(old, cur, new)
    tgt = planner.desired(new, LINKS, cur, **limits, renamed=renamed)
    assert tgt.backends[("q", "t")].id == 0
    assert planner.flows_to_end(old, {}, cur, new, {}, tgt, renamed).backend_ids == {0}


def test_flows_of_a_removed_frontend_end():
    two = from_flags(["10.1.1.101:80", "10.1.1.102:80"], ["10.1.11.101:8080"])
    one = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])
    cur = desired(two)
    tgt = desired(one, cur)
    assert planner.flows_to_end(two, {}, cur, one, {}, tgt, {}).service_ids == {1}


def test_arp_only_on_a_frontends_interfaces():
    cfg = Config(frontends=(Frontend("www", A("10.1.1.101"), 80, "tcp", "p",
                                     interfaces=("eth1",)),), pools=_pool(S1).pools)
    assert desired(cfg).arp == {}        # eth1's subnet does not hold the VIP


def test_removed_frontend_is_deleted_first():
    two = from_flags(["10.1.1.101:80", "10.1.1.102:80"], ["10.1.11.101:8080"])
    st = desired(two)
    one = from_flags(["10.1.1.101:80", "10.1.1.103:80"], ["10.1.11.101:8080"])
    ops = planner.plan(st, desired(one, st))
    assert ops[:3] == [("del_service", A("10.1.1.102"), 80, 6),
                       ("del_arp", 2, A("10.1.1.102")),
                       ("del_vip", A("10.1.1.102"))]
    assert ops[-1][:4] == ("set_service", A("10.1.1.103"), 80, 6)


def test_replacing_every_frontend_never_holds_more_keys_than_the_maps_do():
    """The hash maps hold a config's worth of keys: a plan between two full
    configs with no VIP in common keeps each map within that at every step."""
    def full(first_host):
        vips = [f"10.1.1.{first_host + i}:80" for i in range(LIMITS["max_services"])]
        return from_flags(vips, ["10.1.11.101:8080"])

    def keys(st):
        return {"services": set(st.services), "vips": set(st.vips), "arp": set(st.arp),
                "owners": set(st.owners)}

    cur = desired(full(1))
    tgt = desired(full(101), cur)
    held, most = keys(cur), {name: len(k) for name, k in keys(cur).items()}
    for name, *args in planner.plan(cur, tgt):
        verb, _, what = name.partition("_")
        table = {"service": "services", "vip": "vips", "arp": "arp", "owner": "owners"}.get(what)
        if table is None:
            continue
        key = args[0] if table == "vips" else tuple(args[:2] if table == "arp" else args[:3])
        (held[table].add if verb == "set" else held[table].discard)(key)
        most[table] = max(most[table], len(held[table]))
    assert held == keys(tgt)
    assert most == {"services": 8, "vips": 8, "arp": 8, "owners": 1}


def test_too_many_frontends():
    cfg = from_flags([f"10.1.1.{i}:80" for i in range(1, 10)], ["10.1.11.101:8080"])
    with pytest.raises(planner.CapacityError, match=r"more frontends than the data plane holds \(8\)"):
        desired(cfg)


def test_more_arp_answers_than_the_map_holds():
    """ARP answers are VIPs times the links on their subnets: a host fact that
    `xlb check` cannot know, refused by up and apply before anything is
    written (an audit saw a half-applied config where the map ran out)."""
    cfg = from_flags([f"10.1.1.{i}:80" for i in range(1, 4)], ["10.1.11.101:8080"])
    both = LINKS + [FakeLink(4, "eth2", b"\x04" * 6, IPv4Network("10.1.1.0/24"))]
    assert len(planner.desired(cfg, both, planner.DataplaneState(), **LIMITS,
                               max_arp=6).arp) == 6
    with pytest.raises(planner.CapacityError,
                       match=r"6 ARP answers \(VIPs times the links on their subnets\): "
                             r"the data plane holds 5"):
        planner.desired(cfg, both, planner.DataplaneState(), **LIMITS, max_arp=5)


@pytest.mark.parametrize("named", [False, True])
def test_more_links_than_the_map_holds(named):
    """The links xlb runs on are tx_links' entries: the attach past them failed
    with what the kernel said, after the others. Refused by up and apply
    before anything is written; where none is named, every up Ethernet link
    is one, a host fact that `xlb check` cannot know."""
    links = [FakeLink(i, f"v{i}", b"\x02" * 6, IPv4Network("10.9.0.0/24")) for i in range(1, 6)]
    cfg = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"],
                     [link.name for link in links] if named else [])
    assert planner.desired(cfg, links, planner.DataplaneState(), **LIMITS, max_links=5)
    with pytest.raises(planner.CapacityError) as e:
        planner.desired(cfg, links, planner.DataplaneState(), **LIMITS, max_links=4)
    assert str(e.value) == "5 interfaces: the data plane holds 4" + (
        "" if named else "; no interface is named, so xlb runs on every up Ethernet link: "
                         "name those it serves on (--iface, a frontend's interfaces)")


def test_pool_larger_than_a_ring():
    def pool(n):
        return from_flags(["10.1.1.101:80"], [f"10.1.11.{i}:80" for i in range(1, n + 1)])
    limits = dict(LIMITS, max_backends=64)
    assert len(planner.desired(pool(32), LINKS, planner.DataplaneState(), **limits)
               .services[(A("10.1.1.101"), 80, 6)].slots) == 32         # a full ring
    with pytest.raises(planner.CapacityError, match="33 servers do not fit a ring of 32"):
        planner.desired(pool(33), LINKS, planner.DataplaneState(), **limits)


# --- Maglev pools and timeouts -------------------------------------------------

WWW = (A("10.1.1.101"), 80, 6)


def _maglev(*servers, size=1009, frontends=(("www", "10.1.1.101"),), algorithm="maglev"):
    return Config(frontends=tuple(Frontend(name, A(vip), 80, "tcp", "p")
                                  for name, vip in frontends),
                  pools=(Pool("p", tuple(servers), algorithm, maglev_size=size),))


def _table(size, *servers_ids):
    return list(maglev.table([maglev.Backend(i, s.address, s.port, s.weight)
                              for s, i in servers_ids], size))


def test_maglev_pool_gets_a_table_written_before_the_service():
    st = desired(_maglev(S1, S2))
    svc = st.services[WWW]
    assert (svc.id, svc.ring, svc.maglev, len(svc.slots)) == (0, 0, True, 1009)
    assert list(svc.slots) == _table(1009, (S1, 0), (S2, 1))
    ops = planner.plan(planner.DataplaneState(), st)
    assert [op[0] for op in ops] == ["set_backend", "set_backend", "write_maglev", "set_vip",
                                     "set_arp", "set_owner", "set_owner", "set_timeouts",
                                     "set_service"]
    assert ops[2] == ("write_maglev", 0, list(svc.slots))
    assert ops[-1] == ("set_service", *WWW, 0, 0, 1009, layout.SERVICE_MAGLEV)


def test_every_server_is_owned_by_the_first_frontends_that_it_serves():
    """owners: a server's packet that no reply entry knows may be the reply
    of a connection of its frontends (whose reply entry the LRU evicted
    alone), with or without adopt_replies: the first OWNER_SLOTS of them, in
    the config's order."""
    both = _maglev(S1, S2, frontends=(("www", "10.1.1.101"), ("www2", "10.1.1.102")))
    pair = ((A("10.1.1.101"), 80), (A("10.1.1.102"), 80))
    assert desired(both).owners == {(S1.address, 80, 6): pair, (S2.address, 80, 6): pair}
    second = Config(frontends=both.frontends[1:], pools=both.pools)
    ops = planner.plan(desired(both), desired(second, desired(both)))
    assert [op for op in ops if "owner" in op[0]] == [
        ("set_owner", S1.address, 80, 6, ((A("10.1.1.102"), 80),)),
        ("set_owner", S2.address, 80, 6, ((A("10.1.1.102"), 80),))]
    vips = [f"10.1.1.{101 + i}" for i in range(layout.OWNER_SLOTS + 2)]
    many = _maglev(S1, frontends=tuple((f"www{i}", vip) for i, vip in enumerate(vips)),
                   algorithm="roundrobin")
    assert desired(many).owners == {
        (S1.address, 80, 6): tuple((A(vip), 80) for vip in vips[:layout.OWNER_SLOTS])}


def test_a_frontend_that_adopts_replies_flags_its_service():
    """Only adopt_replies lets a service take over another node's connections
    (SERVICE_ADOPT): its owners are the same either way."""
    plain = _maglev(S1, S2)
    adopting = Config(frontends=(replace(plain.frontends[0], adopt_replies=True),),
                      pools=plain.pools)
    assert desired(plain).services[WWW].flags == layout.SERVICE_MAGLEV
    st = desired(adopting, desired(plain))
    assert st.owners == desired(plain).owners
    assert planner.plan(desired(plain), st) == [
        ("set_service", *WWW, 0, 0, 1009, layout.SERVICE_MAGLEV | layout.SERVICE_ADOPT)]
    assert planner.plan(st, desired(adopting, st)) == []


def test_changed_maglev_table_is_written_beside_and_switched_in_one_write():
    cfg = _maglev(S1, S2)
    st = desired(cfg)
    down = desired(cfg, st, {("p", "s1"): "down"})
    assert planner.plan(st, down) == [
        ("set_backend", 0, S1.address, 80, True),
        ("write_maglev", 1, _table(1009, (S2, 1))),
        ("set_service", *WWW, 0, 1, 1009, layout.SERVICE_MAGLEV)]
    up = desired(cfg, down)
    assert planner.plan(down, up) == [
        ("set_backend", 0, S1.address, 80, False),
        ("write_maglev", 0, _table(1009, (S1, 0), (S2, 1))),
        ("set_service", *WWW, 0, 0, 1009, layout.SERVICE_MAGLEV)]


def test_unchanged_maglev_table_is_not_rewritten():
    cfg = _maglev(S1, S2)
    st = desired(cfg)
    assert planner.plan(st, desired(cfg, st)) == []
    # a change elsewhere (another pool's server) leaves the Maglev service alone
    other = Config(frontends=cfg.frontends + (Frontend("rr", A("10.1.1.102"), 80, "tcp", "q"),),
                   pools=cfg.pools + (Pool("q", (B1,)),))
    st = desired(other)
    ops = planner.plan(st, desired(other, st, {("q", "b1"): "drain"}))
    assert [op[0] for op in ops] == ["set_backend", "write_ring", "set_service"]
    assert ops[-1][1] == A("10.1.1.102")


def test_maglev_pool_with_no_server_up_is_empty():
    cfg = _maglev(S1, S2)
    st = desired(cfg)
    out = desired(cfg, st, {("p", "s1"): "maint", ("p", "s2"): "down"})
    ops = planner.plan(st, out)
    assert "write_maglev" not in [op[0] for op in ops]      # length 0 reads no table
    assert ops[-1] == ("set_service", *WWW, 0, 1, 0, layout.SERVICE_MAGLEV)
    back = desired(cfg, out)
    assert planner.plan(out, back)[-2:] == [
        ("write_maglev", 0, _table(1009, (S1, 0), (S2, 1))),
        ("set_service", *WWW, 0, 0, 1009, layout.SERVICE_MAGLEV)]


def test_nodes_with_one_config_and_states_hold_maglev_tables_of_one_digest():
    """The digest compares the tables of nodes (xlb_pool_table_info): the same
    where a flow goes to the same server whichever node has it, though each
    node numbers its backends its own way; another one where a server, a
    weight, the size or the servers taking flows differ."""
    s3 = Server("s3", A("10.1.11.4"), 80)
    cfg = _maglev(S1, S2)
    one = desired(cfg)
    # The other node ran another config first: its ids are not the first's,
    # nor is its servers' order in the file.
    other = desired(_maglev(S2, S1), desired(_maglev(s3, S2, S1)))
    assert one.services[WWW].slots != other.services[WWW].slots
    digest = planner.table_digests(cfg, one)
    assert digest == planner.table_digests(_maglev(S2, S1), other) == {"p": digest["p"]}
    assert len(digest["p"]) == 16

    def digest_of(config, states={}):
        return planner.table_digests(config, desired(config, states=states))["p"]
    differ = [digest_of(_maglev(replace(S1, weight=2), S2)),
              digest_of(_maglev(S1, S2, s3)),
              digest_of(_maglev(S1, replace(S2, port=81))),
              digest_of(_maglev(S1, S2, size=1013)),
              digest_of(cfg, {("p", "s1"): "down"}),
              digest_of(cfg, {("p", "s1"): "down", ("p", "s2"): "maint"})]
    assert len({digest["p"], *differ}) == 1 + len(differ)
    # What counts is who takes flows: down or drained, s1 takes none.
    assert digest_of(cfg, {("p", "s1"): "drain"}) == digest_of(cfg, {("p", "s1"): "down"})


def test_only_maglev_pools_that_serve_a_frontend_have_a_table_digest():
    """A round-robin ring picks by a per-CPU cursor, never alike on two nodes:
    it has no table to compare. A pool that serves no frontend has no table."""
    cfg = Config(frontends=(Frontend("www", A("10.1.1.101"), 80, "tcp", "p"),
                            Frontend("dns", A("10.1.1.101"), 53, "udp", "p"),
                            Frontend("rr", A("10.1.1.102"), 80, "tcp", "q")),
                 pools=(Pool("p", (S1, S2), "maglev", maglev_size=1009), Pool("q", (B1,)),
                        Pool("w", (S1,), "weighted"), Pool("idle", (S2,), "maglev")))
    digests = planner.table_digests(cfg, desired(cfg))
    assert digests == planner.table_digests(_maglev(S1, S2), desired(_maglev(S1, S2)))


SOURCE = layout.SERVICE_MAGLEV | layout.SERVICE_SOURCE


def test_source_pool_is_a_maglev_table_picked_by_the_client_address():
    """algorithm "source": maglev's table, flagged so that the data plane hashes
    the client's address alone. Switching between the two rewrites no table:
    the flag changes in the service's one write."""
    mg, src = _maglev(S1, S2), _maglev(S1, S2, algorithm="source")
    st = desired(src)
    assert (st.services[WWW].maglev, st.services[WWW].slots) == (
        True, desired(mg).services[WWW].slots)
    assert planner.plan(planner.DataplaneState(), st)[-1] == (
        "set_service", *WWW, 0, 0, 1009, SOURCE)
    to_maglev = desired(mg, st)
    assert planner.plan(st, to_maglev) == [("set_service", *WWW, 0, 0, 1009,
                                            layout.SERVICE_MAGLEV)]
    assert planner.plan(to_maglev, desired(src, to_maglev)) == [
        ("set_service", *WWW, 0, 0, 1009, SOURCE)]
    down = desired(src, st, {("p", "s1"): "down"})
    assert planner.plan(st, down)[-2:] == [("write_maglev", 1, _table(1009, (S2, 1))),
                                           ("set_service", *WWW, 0, 1, 1009, SOURCE)]


def test_source_and_maglev_tables_of_one_slots_have_other_digests():
    """They send a client's flows to other servers: nodes must not take them
    for alike."""
    def digest_of(algorithm):
        config = _maglev(S1, S2, algorithm=algorithm)
        return planner.table_digests(config, desired(config))["p"]
    assert digest_of("source") != digest_of("maglev")


def test_source_frontends_count_among_the_maglev_frontends():
    both = Config(frontends=(Frontend("a", A("10.1.1.101"), 80, "tcp", "p"),
                             Frontend("b", A("10.1.1.102"), 80, "tcp", "p"),
                             Frontend("c", A("10.1.1.103"), 80, "tcp", "q")),
                  pools=(Pool("p", (S1,), "maglev", maglev_size=1009),
                         Pool("q", (S2,), "source", maglev_size=1009)))
    with pytest.raises(planner.CapacityError, match="frontends with a Maglev pool"):
        desired(both)


def _tables_written_in_use(current, ops):
    """The writes of `ops` to a ring or Maglev table that a service still
    reads when they come (its set_service, or del_service, not yet done)."""
    reads = {key: (svc.maglev, svc.ring) for key, svc in current.services.items()}
    clashes = []
    for name, *args in ops:
        if name == "set_service":
            reads[tuple(args[:3])] = (bool(args[-1] & layout.SERVICE_MAGLEV), args[4])
        elif name == "del_service":
            reads.pop(tuple(args))
        elif name in ("write_ring", "write_maglev") and \
                (name == "write_maglev", args[0]) in reads.values():
            clashes.append((name, args[0]))
    return clashes


def test_a_maglev_table_left_by_a_switched_frontend_is_not_written_while_it_reads_it():
    """With every Maglev table pair taken, frontend a leaves Maglev while c
    comes to "source" in one apply: c takes a's pair, and must fill the table
    of it that a does not read, or a's new flows go to c's servers until a
    switches to its ring."""
    def config(a, b, c):
        return Config(frontends=(Frontend("a", A("10.1.1.101"), 80, "tcp", a),
                                 Frontend("b", A("10.1.1.102"), 80, "tcp", b),
                                 Frontend("c", A("10.1.1.103"), 80, "tcp", c)),
                      pools=(Pool("mg", (S1,), "maglev", maglev_size=1009),
                             Pool("src", (S2,), "source", maglev_size=1009),
                             Pool("rr", (B1,))))
    st = desired(config("mg", "mg", "rr"))
    switched = desired(config("rr", "mg", "src"), st)
    ops = planner.plan(st, switched)
    assert _tables_written_in_use(st, ops) == []
    c = switched.services[(A("10.1.1.103"), 80, 6)]
    assert (c.ring // 2, c.source) == (st.services[(A("10.1.1.101"), 80, 6)].ring // 2, True)
    # and back: a takes the pair c leaves, beside the table c reads
    back = desired(config("mg", "mg", "rr"), switched)
    assert _tables_written_in_use(switched, planner.plan(switched, back)) == []


def test_maglev_table_of_the_backups_while_no_primary_is_up():
    st = desired(_maglev(S1, S2, B1), states={("p", "s1"): "down", ("p", "s2"): "drain"})
    assert set(st.services[WWW].slots) == {2}


def test_switching_between_a_ring_and_a_maglev_table():
    rr = _pool(S1, S2)
    mg = _maglev(S1, S2)
    st = desired(rr)
    to_maglev = desired(mg, st)
    assert planner.plan(st, to_maglev) == [
        ("write_maglev", 0, _table(1009, (S1, 0), (S2, 1))),
        ("set_service", *WWW, 0, 0, 1009, layout.SERVICE_MAGLEV)]
    back = desired(rr, to_maglev)
    assert planner.plan(to_maglev, back) == [("write_ring", 0, [0, 1]),
                                            ("set_service", *WWW, 0, 0, 2, 0)]


def test_each_maglev_frontend_has_its_pair_of_tables_and_their_number_is_limited():
    two = _maglev(S1, S2, frontends=(("a", "10.1.1.101"), ("b", "10.1.1.102")))
    st = desired(two)
    assert [(s.id, s.ring) for s in st.services.values()] == [(0, 0), (1, 2)]
    changed = desired(two, st, {("p", "s2"): "down"})
    assert [s.ring for s in changed.services.values()] == [1, 3]
    three = _maglev(S1, S2, frontends=(("a", "10.1.1.101"), ("b", "10.1.1.102"),
                                       ("c", "10.1.1.103")))
    with pytest.raises(planner.CapacityError,
                       match=r"^more frontends with a Maglev pool than the data plane holds "
                             r"\(2\)$"):
        desired(three)
    # frontends of other pools do not count
    mixed = Config(frontends=two.frontends + (Frontend("c", A("10.1.1.103"), 80, "tcp", "q"),),
                   pools=two.pools + (Pool("q", (B1,)),))
    assert [s.maglev for s in desired(mixed).services.values()] == [True, True, False]


def test_maglev_pool_is_not_held_to_the_ring_size():
    servers = [Server(f"s{i}", A(f"10.1.12.{i}"), 80) for i in range(1, 41)]    # ring_size 32
    st = planner.desired(_maglev(*servers, size=4001), LINKS, planner.DataplaneState(),
                         **{**LIMITS, "max_backends": 64})
    assert len(set(st.services[WWW].slots)) == 40


def test_maglev_pool_shares_slots_by_weight():
    slots = desired(_maglev(S1, replace(S2, weight=3), size=4001)).services[WWW].slots
    assert abs(slots.count(1) / slots.count(0) - 3) < 0.1


def test_timeouts_are_set_before_the_service_and_again_only_when_changed():
    fe = Frontend("www", A("10.1.1.101"), 80, "tcp", "p", timeout_syn=5, timeout_udp=30)
    cfg = Config(frontends=(fe,), pools=_pool(S1).pools)
    st = desired(cfg)
    names = [op[0] for op in planner.plan(planner.DataplaneState(), st)]
    assert names.index("set_timeouts") < names.index("set_service")
    assert st.services[WWW].timeouts == (5, 900, 120, 30)
    longer = Config(frontends=(Frontend("www", A("10.1.1.101"), 80, "tcp", "p",
                                        timeout_established=3600),), pools=cfg.pools)
    assert planner.plan(st, desired(longer, st)) == [("set_timeouts", 0, 60, 3600, 120, 300)]


def test_unknown_timeouts_are_set_again():
    st = desired(SEED)
    svc = st.services[WWW]
    adopted = planner.DataplaneState({WWW: planner.ServiceState(svc.id, svc.ring, svc.slots)},
                                     st.backends, st.vips, st.arp, st.owners)
    assert planner.plan(adopted, st) == [("set_timeouts", 0, 60, 900, 120, 300)]


def test_execute_writes_each_run_of_server_entries_in_one_call_in_its_order():
    """execute hands each run of consecutive set_backend (set_owner, del_owner)
    ops to one set_backends (set_owners, del_owners) call, in their order, and
    every other op to its own call between them: the maps are written in the
    plan's order."""
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *args: calls.append((name, *args))
    x, y = A("10.1.11.1"), A("10.1.11.2")
    owned = ((A("10.1.1.1"), 80),)
    planner.execute(Recorder(), [
        ("del_owner", x, 80, 6), ("del_owner", y, 80, 6), ("del_vip", A("10.1.1.2")),
        ("set_backend", 0, x, 80, True), ("set_backend", 1, y, 80, False),
        ("clear_backend_counters", 2), ("set_backend", 2, x, 81, False), ("write_ring", 0, [1, 2]),
        ("set_owner", y, 80, 6, owned), ("set_owner", x, 81, 6, owned),
        ("set_service", A("10.1.1.1"), 80, 6, 0, 0, 2, 0), ("set_owner", y, 80, 17, owned)])
    assert calls == [
        ("del_owners", [(x, 80, 6), (y, 80, 6)]), ("del_vip", A("10.1.1.2")),
        ("set_backends", [(0, x, 80, True), (1, y, 80, False)]),
        ("clear_backend_counters", 2), ("set_backends", [(2, x, 81, False)]),
        ("write_ring", 0, [1, 2]), ("set_owners", [(y, 80, 6, owned), (x, 81, 6, owned)]),
        ("set_service", A("10.1.1.1"), 80, 6, 0, 0, 2, 0), ("set_owners", [(y, 80, 17, owned)])]


class FakeMaps:
    """What the maps hold after a series of plans: which services, and every
    backend entry ever written (removed servers stay, closed). Rings, Maglev
    tables and timeouts are not kept: the test takes them from the state."""

    def __init__(self):
        self.services, self.backends, self.arp, self.vips = set(), {}, {}, set()
        self.owners = {}

    def set_backends(self, backends):
        for i, addr, port, closed in backends:
            self.backends[i] = planner.BackendState(i, addr, port, closed)

    def set_service(self, vip, port, proto, *args):
        self.services.add((vip, port, proto))

    def del_service(self, vip, port, proto):
        self.services.discard((vip, port, proto))

    def set_vip(self, vip):
        self.vips.add(vip)

    def del_vip(self, vip):
        self.vips.discard(vip)

    def set_arp(self, ifindex, vip, mac):
        self.arp[(ifindex, vip)] = mac

    def del_arp(self, ifindex, vip):
        del self.arp[(ifindex, vip)]

    def set_owners(self, owners):
        for addr, port, proto, services in owners:
            self.owners[(addr, port, proto)] = tuple(services)

    def del_owners(self, endpoints):
        for endpoint in endpoints:
            del self.owners[endpoint]

    def __getattr__(self, name):        # write_ring, write_maglev, set_timeouts
        return lambda *args: None


def applied(*steps):
    """Each (config, server states) planned and written in turn into FakeMaps:
    the last state, what the maps hold with no backend named (as
    Datapath.held reads them back) and their backend entries."""
    maps, st = FakeMaps(), planner.DataplaneState()
    for cfg, states in steps:
        target = desired(cfg, st, states)
        planner.execute(maps, planner.plan(st, target))
        st = target
    held = planner.DataplaneState({k: st.services[k] for k in maps.services}, {},
                                  frozenset(maps.vips), maps.arp, maps.owners)
    return st, held, maps.backends


def test_recover_names_the_maps_after_their_config():
    """recover names the backend entries that a series of applies left in the
    maps (known there by id, address and port only) after the config: every
    (pool, server) gets the id the running control plane gave it, servers in
    both pools included, so applying the same config again writes nothing.
    Only the backends are recover's work: the rest of `held` (services, VIPs,
    ARP, owners) it returns as given, here the services of the running state
    and the VIPs, ARP entries and owners the writes left."""
    shared = Server("shared", A("10.1.11.50"), 80)
    first = Config(frontends=(Frontend("a", A("10.1.1.101"), 80, "tcp", "pa"),
                              Frontend("b", A("10.1.1.102"), 80, "tcp", "pb")),
                   pools=(Pool("pa", (S1, shared)), Pool("pb", (shared, S2))))
    # S1 removed (its entry stays, closed), new servers, and pb listed first:
    # ids no longer follow the order a fresh start would give. The shared
    # server's two entries (one address and port) are told apart by the rings
    # only (by id order pb's would take pa's id); s4's, new and down in both
    # pools so in no ring, by id order only.
    s4 = Server("s4", A("10.1.11.4"), 80)
    second = Config(frontends=first.frontends,
                    pools=(Pool("pb", (S2, shared, s4)),
                           Pool("pa", (shared, Server("s3", A("10.1.11.3"), 80), s4))))
    down = {("pb", "s2"): "down", ("pb", "s4"): "down", ("pa", "s4"): "down"}
    st, held, backends = applied((first, {}), (second, down))
    got = planner.recover(second, held, backends)
    assert got.backends == st.backends
    assert got.retired_backends.keys() == st.retired_backends.keys() == {0}       # S1's
    assert planner.plan(got, desired(second, got, down)) == []
    assert desired(second).backends != st.backends  # rebuilding from scratch moves ids


def test_recover_leaves_a_server_in_another_pools_ring_to_that_pool():
    """A server added to pool pa, where it is drained, after pool pb had it:
    pa's entry is newer, in no ring, and pb's is in pb's ring. recover names
    pb's after pb: by id order pa took it, and pb's server, named after the
    closed entry, started down after a restart (its frontend dropping every
    new flow until its first check), each pool counting the other's traffic."""
    shared = Server("shared", A("10.1.11.50"), 80)
    frontends = (Frontend("a", A("10.1.1.101"), 80, "tcp", "pa"),
                 Frontend("b", A("10.1.1.101"), 81, "tcp", "pb"))
    first = Config(frontends=frontends, pools=(Pool("pa", (S2,)), Pool("pb", (shared,))))
    second = replace(first, pools=(Pool("pa", (S2, shared)), Pool("pb", (shared,))))
    drained = {("pa", "shared"): "drain"}
    st, held, backends = applied((first, {}), (second, drained))
    got = planner.recover(second, held, backends)
    assert got.backends == st.backends
    assert planner.plan(got, desired(second, got, drained)) == []
    # Drained in both pools, so in no ring: the ids its control process
    # saved tell them apart (by id order each pool took the other's).
    both = {**drained, ("pb", "shared"): "drain"}
    st, held, backends = applied((first, {}), (second, both))
    ids = {k: b.id for k, b in st.backends.items()}
    assert planner.recover(second, held, backends, ids).backends == st.backends


@pytest.mark.parametrize("restart", [False, True], ids=["same instance", "restarted"])
def test_a_server_back_at_its_address_takes_its_retired_id(restart):
    """s2 removed by one change and back by a later one, at its address and
    port, drained: it takes the id that its kept flows name, its counters
    cleared, also when a restart read the maps back in between. A restart
    after that reads one entry at its address back, named as it ran: with
    two (a new id beside the retired one), one drained or down, in no ring,
    was named after the older, and its active flows (its connections) read 0."""
    drained = {("p", "s2"): "drain"}
    maps, st = FakeMaps(), planner.DataplaneState()
    for i, (cfg, states) in enumerate(((_pool(S1, S2), {}), (_pool(S1), {}),
                                       (_pool(S1, S2), drained))):
        if i == 2 and restart:      # before it came back
            held = planner.DataplaneState({k: st.services[k] for k in maps.services}, {},
                                          frozenset(maps.vips), maps.arp)
            st = planner.recover(_pool(S1), held, maps.backends)
            assert st.retired_backends == {1: (S2.address, S2.port)}
        target = desired(cfg, st, states)
        ops = planner.plan(st, target)
        planner.execute(maps, ops)
        st = target
    assert {k[1]: b.id for k, b in st.backends.items()} == {"s1": 0, "s2": 1}
    assert st.retired_backends == {}
    assert ops.index(("clear_backend_counters", 1)) < ops.index(
        ("set_backend", 1, S2.address, S2.port, True))
    held = planner.DataplaneState({k: st.services[k] for k in maps.services}, {},
                                  frozenset(maps.vips), maps.arp, maps.owners)
    assert planner.recover(_pool(S1, S2), held, maps.backends).backends == st.backends


def test_of_two_retired_ids_at_one_address_a_server_back_takes_one():
    """A data path of an earlier build holds two retired entries at s2's
    address and port: s2 back takes one; the other stays retired, as does s3's,
    and a newcomer takes an id never used."""
    retired = {1: (S2.address, S2.port), 2: (S2.address, S2.port),
               3: (A("10.1.11.3"), 80)}
    st = replace(desired(_pool(S1)), retired_backends=retired)
    new = desired(_pool(S1, S2, Server("s4", A("10.1.11.4"), 80)), st)
    assert new.backends[("p", "s2")].id in (1, 2)
    assert new.backends[("p", "s4")].id == 4
    assert new.retired_backends == {i: retired[i] for i in (1, 2, 3)
                                    if i != new.backends[("p", "s2")].id}


def test_a_server_back_in_two_pools_takes_its_retired_id_in_one_alone():
    """s2 back at its address and port in two pools at once: one of its
    entries takes the retired id, the other a new one (two pools' servers
    sharing an id would be one entry for both)."""
    st = replace(desired(_pool(S1)), retired_backends={1: (S2.address, S2.port)})
    alt = Frontend("alt", A("10.1.1.102"), 80, "tcp", "q")
    both = Config(frontends=(*_pool(S1).frontends, alt),
                  pools=(Pool("p", (S1, S2)), Pool("q", (S2,))))
    new = desired(both, st)
    assert sorted(new.backends[(p, "s2")].id for p in ("p", "q")) == [1, 2]
    assert new.retired_backends == {}


def _frontends(*pools):
    """Frontends www0, www1, ... on ports 80, 81, ... of one VIP, to these pools."""
    return tuple(Frontend(f"www{i}", A("10.1.1.101"), 80 + i, "tcp", p)
                 for i, p in enumerate(pools))


def test_a_renamed_pool_that_serves_one_of_its_frontends_is_the_same_pool():
    """Any one frontend in common makes it the same pool, whichever it is."""
    old = Config(frontends=_frontends("p", "p"), pools=(Pool("p", (S1,)),))
    for kept in range(2):
        fronts = [replace(f, pool="web") if i == kept else f
                  for i, f in enumerate(_frontends("p", "p"))]
        new = Config(frontends=tuple(fronts),
                     pools=(Pool("p", (S2,)), Pool("web", (replace(S1, name="t"),))))
        cur, tgt, ends = _renamed(old, new)
        assert tgt.backends[("web", "t")].id == 0, kept


def test_a_server_that_stays_takes_no_other_ones_id():
    """s1, in pools p and q, stays in p, which takes q's frontend: q's s1 is
    gone, not renamed to p's, whose id and flows stay."""
    p, q = Pool("p", (S1,), on_server_down="reset"), Pool("q", (S1,), on_server_down="reset")
    old = Config(frontends=_frontends("p", "q"), pools=(p, q))
    new = Config(frontends=_frontends("p", "p"), pools=(p,))
    cur, tgt, ends = _renamed(old, new)
    assert {k: b.id for k, b in tgt.backends.items()} == {("p", "s1"): 0}
    assert tgt.retired_backends.keys() == {1}
    assert ends.backend_ids == {1}


@pytest.mark.parametrize("rename,other,kept", [("c", "b", ("p", "a")), ("c", "c", ("p", "a")),
                                                ("s1", "b", ("p", "s1"))],
                         ids=["its pool", "its pool before its name", "its name"])
def test_a_renamed_server_is_found_in_its_pool_first_then_by_its_name(rename, other, kept):
    """Of two old servers at its address and port, both of pools that served
    its frontends, a server is the one of its own pool (though the other has
    its name), else the one of its name (not the one of the lower id)."""
    old = Config(frontends=_frontends("q", "p"),
                 pools=(Pool("q", (replace(S1, name=other),)),
                        Pool("p", (replace(S1, name="a" if rename == "c" else "s1"),))))
    pool = "p" if rename == "c" else "r"
    new = Config(frontends=_frontends(pool, pool), pools=(Pool(pool, (replace(S1, name=rename),)),))
    cur, tgt, ends = _renamed(old, new)
    assert tgt.backends[(pool, rename)].id == cur.backends[kept].id == 1


def test_pools_regrouped_keep_each_server_once():
    """s1 in pools p and q, regrouped into r and t, each serving a frontend of
    both: each old one is one new one, in id order, and no flow ends."""
    old = Config(frontends=_frontends("p", "q", "p", "q"),
                 pools=(Pool("p", (S1,), on_server_down="reset"),
                        Pool("q", (S1,), on_server_down="reset")))
    new = Config(frontends=_frontends("r", "r", "t", "t"),
                 pools=(Pool("r", (S1,), on_server_down="reset"),
                        Pool("t", (S1,), on_server_down="reset")))
    cur, tgt, ends = _renamed(old, new)
    assert {k: b.id for k, b in tgt.backends.items()} == {("r", "s1"): 0, ("t", "s1"): 1}
    assert ends.backend_ids == set()


@pytest.mark.parametrize("old_policy,new_policy,ended", [("keep", "reset", {0}),
                                                         ("reset", "keep", set())])
def test_a_server_down_in_a_renamed_pool_follows_the_new_pools_policy(old_policy, new_policy,
                                                                     ended):
    old = _pool(S1, S2, on_server_down=old_policy)
    new = Config(frontends=(replace(old.frontends[0], pool="web"),),
                 pools=(Pool("web", (S1, S2), on_server_down=new_policy),))
    _, _, ends = _renamed(old, new, new_states={("web", "s1"): "down"})
    assert ends.backend_ids == ended


def test_a_renamed_server_put_in_maint_has_its_flows_ended():
    old = _pool(S1, S2)
    new = _pool(replace(S1, name="t"), S2)
    _, tgt, ends = _renamed(old, new, new_states={("p", "t"): "maint"})
    assert tgt.backends[("p", "t")].id == 0
    assert ends.backend_ids == {0}


def test_a_pool_of_another_name_serving_another_protocol_is_another_pool():
    """A frontend is its VIP, port and protocol: VIP:80/udp is not VIP:80/tcp."""
    old = _pool(S1)
    udp = replace(old.frontends[0], protocol="udp", pool="q")
    new = Config(frontends=(udp,), pools=(Pool("q", (replace(S1, name="t"),)),))
    cur, tgt, ends = _renamed(old, new)
    assert tgt.backends[("q", "t")].id == 1 and tgt.retired_backends.keys() == {0}


def test_an_apply_holds_the_garbage_collector_off_and_gives_it_back():
    """The objects an apply makes live on (the config, the state): collections
    set off meanwhile, some of the whole heap, found nothing and took a third
    of its time. The collector runs again after it, one that fails too, and
    one held off by its caller stays off."""
    from xlb.balancer import Balancer, collector_paused
    from xlb.datapath import Limits

    running = []

    class Maps:             # takes every write, and notes whether the collector ran at each server
        limits = Limits()

        def set_backends(self, backends):
            for _ in backends:
                running.append(gc.isenabled())
                if len(running) == 3:
                    raise OSError("refused")

        def delete_flows(self, *args):
            return {"flows": 0, "flows_new": 0}

        def __getattr__(self, name):
            return lambda *args, **kw: None

    b = Balancer(Maps())
    b.apply(SEED, relink=False)
    assert running == [False, False] and gc.isenabled()
    with pytest.raises(OSError):
        b.apply(from_flags(["10.1.1.101:80"], ["10.1.11.103:8080"]), relink=False)
    assert running[2:] == [False] * len(running[2:]) and gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
