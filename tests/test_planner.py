"""From config to map writes: ids, rings, ARP placement and the order of writes."""

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from xlb import planner
from xlb.model import from_flags

LIMITS = dict(max_services=8, max_backends=16, ring_size=32)
A = IPv4Address


@dataclass(frozen=True)
class FakeLink:
    index: int
    mac: bytes
    net: IPv4Network

    def holds(self, addr):
        return addr in self.net


LINKS = [FakeLink(2, b"\x02" * 6, IPv4Network("10.1.1.0/24")),
         FakeLink(3, b"\x03" * 6, IPv4Network("10.1.11.0/24"))]
SEED = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080", "10.1.11.102:8080"])


def desired(cfg, previous=planner.DataplaneState()):
    return planner.desired(cfg, LINKS, previous, **LIMITS)


def test_seed_state():
    st = desired(SEED)
    svc = st.services[(A("10.1.1.101"), 80, 6)]
    assert (svc.id, svc.ring, svc.slots) == (0, 0, (0, 1))
    assert {k: (b.id, str(b.address), b.port) for k, b in st.backends.items()} == {
        ("default", "10.1.11.101:8080"): (0, "10.1.11.101", 8080),
        ("default", "10.1.11.102:8080"): (1, "10.1.11.102", 8080)}
    # ARP is answered only on the link whose subnet holds the VIP.
    assert st.arp == {(2, A("10.1.1.101")): b"\x02" * 6}
    assert st.vips == {A("10.1.1.101")}


def test_first_plan_writes_the_service_last():
    ops = planner.plan(planner.DataplaneState(), desired(SEED))
    names = [op[0] for op in ops]
    assert names == ["set_backend", "set_backend", "write_ring", "set_vip", "set_arp",
                     "set_service"]
    assert ops[-1] == ("set_service", A("10.1.1.101"), 80, 6, 0, 0, 2)


def test_same_config_plans_nothing():
    st = desired(SEED)
    assert planner.plan(st, desired(SEED, st)) == []


def test_changed_backends_go_to_the_other_ring_before_the_switch():
    st = desired(SEED)
    cfg = from_flags(["10.1.1.101:80"], ["10.1.11.102:8080", "10.1.11.103:8080"])
    new = desired(cfg, st)
    svc = new.services[(A("10.1.1.101"), 80, 6)]
    assert svc.ring == 1                      # beside ring 0, which is in use
    # the kept server keeps its id; the new one takes the lowest free id
    assert new.backends[("default", "10.1.11.102:8080")].id == 1
    assert new.backends[("default", "10.1.11.103:8080")].id == 0
    ops = planner.plan(st, new)
    names = [op[0] for op in ops]
    assert names.index("write_ring") < names.index("set_service")
    assert ("write_ring", 1, [1, 0]) in ops


def test_removed_frontend_is_deleted_after_the_rest():
    two = from_flags(["10.1.1.101:80", "10.1.1.102:80"], ["10.1.11.101:8080"])
    st = desired(two)
    one = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])
    ops = planner.plan(st, desired(one, st))
    assert ops == [("del_service", A("10.1.1.102"), 80, 6),
                   ("del_arp", 2, A("10.1.1.102")),
                   ("del_vip", A("10.1.1.102"))]


def test_execute_calls_the_datapath_in_order():
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *args: calls.append((name, *args))

    ops = planner.plan(planner.DataplaneState(), desired(SEED))
    planner.execute(Recorder(), ops)
    assert calls == ops


def test_too_many_frontends():
    cfg = from_flags([f"10.1.1.{i}:80" for i in range(1, 10)], ["10.1.11.101:8080"])
    with pytest.raises(planner.CapacityError, match=r"more frontends than the data plane holds \(8\)"):
        desired(cfg)


def test_pool_larger_than_a_ring():
    cfg = from_flags(["10.1.1.101:80"], [f"10.1.11.{i}:80" for i in range(1, 34)])
    with pytest.raises(planner.CapacityError, match="33 backends do not fit a ring of 32"):
        planner.desired(cfg, LINKS, planner.DataplaneState(), max_services=8, max_backends=64,
                        ring_size=32)
