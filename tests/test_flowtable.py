"""control/flowtable.py without a kernel: rows built as the maps hold them."""

import ctypes
import socket
from ipaddress import IPv4Address

from xlb import flowtable, layout
from xlb.flowtable import Row

STATE = layout.FLOW_STATES
CLIENT, VIP, BACKEND = (int.from_bytes(IPv4Address(a).packed, "little")
                        for a in ("10.1.1.10", "10.1.1.101", "10.1.11.101"))
SEC = 1_000_000_000         # the maps' times are nanoseconds (bpf/clock.h): not flowtable's
                            # own constant, which a wrong unit would leave agreeing with itself
NOW = 1000 * SEC


def connection(sport: int, state: str = "established", timeout: int = 900,
               seen_fwd: int = NOW, seen_reply: int = NOW, backend_id: int = 7):
    """The forward and reply rows of one TCP connection, client port sport."""
    sp, vp, bp = socket.htons(sport), socket.htons(80), socket.htons(8080)
    fwd = Row(CLIENT, VIP, sp, vp, 6, BACKEND, bp, layout.FLOW_FORWARD, STATE[state], 1,
              backend_id, timeout, seen_fwd)
    reply = Row(BACKEND, CLIENT, bp, sp, 6, VIP, vp, layout.FLOW_REPLY, STATE[state], 1,
                backend_id, timeout, seen_reply)
    return fwd, reply


def test_each_entry_names_its_partner():
    fwd, reply = connection(40000)
    assert fwd.partner() == reply.key() and reply.partner() == fwd.key()


def as_the_map_holds(ctype, row: Row) -> bytes:
    """row's fields laid out by the ctypes mirror of bpf/xlb_shared.h (the one
    checked against the C), the padding filled with 0xff."""
    entry = ctype.from_buffer_copy(b"\xff" * ctypes.sizeof(ctype))
    for name, _ in ctype._fields_:
        if name != "pad":
            setattr(entry, name, getattr(row, name))
    return bytes(entry)


def dump(*rows: Row) -> tuple[bytes, bytes]:
    return (b"".join(as_the_map_holds(layout.FlowKey, r) for r in rows),
            b"".join(as_the_map_holds(layout.Flow, r) for r in rows))


def sweep(rows: list[Row], now: int, half_open: set[bytes] | None = None) -> flowtable.Sweep:
    """flowtable.sweep of a dump of rows, its dead connections as rows."""
    swept = flowtable.sweep(*dump(*rows), now, half_open)
    return swept._replace(dead=[tuple(rows[i] for i in c) for c in swept.dead])


def test_decode_reads_what_the_maps_hold():
    """Keys and values built from layout.FlowKey and layout.Flow, not from
    flowtable's own struct formats, neighbouring fields with values of their
    own: a format that drifts from the shared layout (order, width, padding)
    fails here."""
    fwd, reply = connection(40001, seen_reply=NOW - 5 * SEC)
    assert flowtable.decode(*dump(fwd, reply)) == [fwd, reply]


def test_a_connection_is_dead_only_when_both_entries_are_idle_past_its_timeout():
    idle = connection(40002, seen_fwd=NOW - 901 * SEC, seen_reply=NOW - 950 * SEC)
    one_way = connection(40003, seen_fwd=NOW - 2000 * SEC, seen_reply=NOW - 10 * SEC)
    young = connection(40004, seen_fwd=NOW - 899 * SEC, seen_reply=NOW - 899 * SEC)
    never = connection(40005, timeout=0, seen_fwd=1, seen_reply=1)
    assert sweep([*idle, *one_way, *young, *never], NOW).dead == [idle]


def test_idle_exactly_its_timeout_is_not_dead_yet():
    """Dead is idle more than the timeout, as the program judges it
    (xlb_older_than): the sweep must not take what the program still carries."""
    at = connection(40013, seen_fwd=NOW - 900 * SEC, seen_reply=NOW - 900 * SEC)
    past = connection(40014, seen_fwd=NOW - 900 * SEC - 1, seen_reply=NOW - 900 * SEC - 1)
    assert sweep([*at, *past], NOW).dead == [past]
    # The later entry decides, and so does a lone one in the established table.
    reply_at = connection(40018, seen_fwd=NOW - 901 * SEC, seen_reply=NOW - 900 * SEC)
    assert sweep([*reply_at], NOW).dead == []
    assert sweep([at[0]], NOW, set()).dead == []


def test_an_entry_without_its_partner_is_judged_alone():
    """(Counted as a connection only if it is the forward entry: a lone reply
    entry's connection was counted, as evicted, when its forward entry went.)"""
    fwd, reply = connection(40006, seen_fwd=NOW - 901 * SEC, seen_reply=NOW - 901 * SEC)
    assert sweep([reply], NOW) == ([(reply,)], [])
    assert sweep([reply], NOW, set()) == ([(reply,)], [])     # in the established table
    assert sweep([fwd], NOW) == ([(fwd,)], [])
    assert sweep([fwd], NOW - 2 * SEC) == ([], [])


def test_a_live_forward_entry_without_its_reply_entry_gets_it_back():
    """The reply entry comes back as the program wrote it (but for the time
    of its last packet, taken from the forward entry); an idle forward entry
    or a lone reply entry gets nothing."""
    live_fwd, live_reply = connection(40008, seen_fwd=NOW - 10 * SEC, seen_reply=NOW - 20 * SEC)
    idle_fwd, _ = connection(40009, seen_fwd=NOW - 901 * SEC)
    _, lone_reply = connection(40010)
    whole = connection(40011)
    got = sweep([live_fwd, idle_fwd, lone_reply, *whole], NOW, set()).orphans
    assert got == [live_fwd]
    assert flowtable.decode(*live_fwd.reply()) == [live_reply._replace(seen=NOW - 10 * SEC)]
    # Rows of the half-open table (no half_open given) are never mended.
    assert sweep([live_fwd], NOW).orphans == []


def test_what_the_half_open_table_holds_decides_the_mending():
    """A reply key that the half-open table holds is another connection's
    (the same client port to two VIPs of one server): not put back. A lone
    reply entry whose connection opened again in the half-open table goes
    (not counted: its connection was counted when the forward entry went)."""
    fwd, reply = connection(40012)
    assert sweep([fwd], NOW, {reply.key()}) == ([], [])
    assert sweep([reply], NOW, {fwd.key()}) == ([(reply,)], [])
    assert sweep([reply], NOW, set()) == ([], [])


def test_a_clock_read_before_a_packet_on_another_cpu_is_no_idleness():
    fwd, reply = connection(40007, timeout=1, seen_fwd=NOW + SEC, seen_reply=NOW + SEC)
    assert sweep([fwd, reply], NOW) == ([], [])


def test_census_counts_connections_by_state_and_open_ones_by_backend():
    old = NOW - 901 * SEC
    rows = {"flows": [*connection(1, backend_id=1), *connection(2, backend_id=1),
                      *connection(3, backend_id=2), *connection(4, "closing", 120),
                      *connection(5, seen_fwd=old, seen_reply=old),
                      *connection(9, backend_id=2, seen_fwd=NOW - 900 * SEC)],
            "flows_new": [*connection(6, "new", 60), *connection(7, "answered", 60),
                          *connection(8, "closing", 120)]}
    c = flowtable.census({name: dump(*table) for name, table in rows.items()}, NOW)
    assert (c.established, c.closing, c.half_open) == (4, 2, 2)
    assert c.open == {1: 2, 2: 2}       # idle exactly its timeout: open still
    assert c.entries == {"flows": 12, "flows_new": 6}
    assert c.forward == {"flows": 6, "flows_new": 3}


def test_census_counts_a_connection_live_while_either_entry_is():
    """As the data path (flow_alive) and the sweep judge it: a server that
    pushes to a silent client keeps its connection open, and its forward
    entry idle. Its reply entry is found by key, in its own table only."""
    old = NOW - 901 * SEC
    pushed, pushed_reply = connection(1, backend_id=1, seen_fwd=old)
    answered, answered_reply = connection(2, "answered", 60, seen_fwd=old)
    silent = connection(3, backend_id=1, seen_fwd=old, seen_reply=old)
    elsewhere, elsewhere_reply = connection(4, backend_id=1, seen_fwd=old)
    c = flowtable.census({"flows": dump(pushed, pushed_reply, *silent, elsewhere),
                          "flows_new": dump(answered, answered_reply, elsewhere_reply)}, NOW)
    assert (c.established, c.closing, c.half_open) == (1, 0, 1)
    assert c.open == {1: 1}


def test_census_counts_a_connection_whose_later_entry_is_idle_exactly_its_timeout_open():
    """As the sweep takes it (not dead yet): whichever entry was seen later,
    forward or reply, exactly the timeout ago."""
    at, old = NOW - 900 * SEC, NOW - 901 * SEC
    rows = [*connection(1, backend_id=1, seen_fwd=at, seen_reply=old),
            *connection(2, backend_id=2, seen_fwd=old, seen_reply=at),
            *connection(3, backend_id=3, seen_fwd=old, seen_reply=old)]
    c = flowtable.census({"flows": dump(*rows)}, NOW)
    assert (c.established, c.open) == (2, {1: 1, 2: 1})


def test_a_catch_up_takes_the_entries_missing_or_seen_earlier_in_the_new_table():
    """Datapath._catch_up: after the swap, a resized table takes from the old
    one a connection opened since the copy and one that went on; not one the
    new program has seen later, nor one unchanged."""
    opened, _ = connection(40001, seen_fwd=NOW + 5)
    went_on, _ = connection(40002, seen_fwd=NOW + 3)
    touched, _ = connection(40003, seen_fwd=NOW + 2)
    idle, _ = connection(40004)
    copied = [connection(p)[0] for p in (40002, 40004)]
    since_swap = connection(40003, seen_fwd=NOW + 4, backend_id=8)[0]
    assert flowtable.newer(dump(opened, went_on, touched, idle), dump(*copied, since_swap)) \
        == [dump(opened), dump(went_on)]


def test_the_sweep_of_a_dump_judges_each_kind_of_entry_among_the_others():
    """The sweep looks only at entries idle past their timeout and, in the
    established table, those without their partner: what it finds of each
    kind is what it finds of it alone."""
    live = connection(41000)
    idle = connection(41002, seen_fwd=NOW - 901 * SEC, seen_reply=NOW - 950 * SEC)
    half_idle = [*connection(41001, seen_fwd=NOW - 950 * SEC),
                 *connection(41003, seen_fwd=NOW - 10 * SEC, seen_reply=NOW - 950 * SEC)]
    lone_live_fwd, _ = connection(41004)
    lone_idle_fwd, _ = connection(41005, seen_fwd=NOW - 901 * SEC)
    _, lone_reply = connection(41006)
    _, reopened_reply = connection(41007)
    rows = [*live, *idle, *half_idle, lone_live_fwd, lone_idle_fwd, lone_reply, reopened_reply]
    half_open = {connection(41007)[0].key()}
    assert sweep(rows, NOW, half_open) == \
        ([idle, (lone_idle_fwd,), (reopened_reply,)], [lone_live_fwd])
    # The half-open table (no half_open) is only swept, never mended.
    assert sweep(rows, NOW) == ([idle, (lone_idle_fwd,)], [])


def test_an_entry_read_twice_is_judged_as_read_last():
    """A batched read of a table that changes may meet a key twice."""
    old = connection(41010, seen_fwd=NOW - 901 * SEC, seen_reply=NOW - 901 * SEC)
    again = old[0]._replace(seen=NOW)
    assert sweep([*old, again], NOW) == ([], [])
    assert sweep([again, *old], NOW) == ([old], [])


def test_an_open_connection_is_neither_closing_nor_idle_both_ways():
    """What a change that ends a server's connections counts as ended."""
    def is_open(fwd, reply=None):
        return flowtable.open_count([fwd], [fwd, reply] if reply else [fwd], NOW) == 1
    old = NOW - 901 * SEC
    assert is_open(*connection(40015))
    assert not is_open(*connection(40016, "closing", 120))
    assert not is_open(*connection(40017, seen_fwd=old, seen_reply=old))
    assert not is_open(connection(40018, seen_fwd=old)[0])      # its reply entry not read
    assert is_open(*connection(40018, seen_fwd=old))            # the server speaks
    # Idle exactly its timeout is open still, as the sweep and the program judge it.
    assert is_open(*connection(40019, seen_fwd=NOW - 900 * SEC, seen_reply=old))


def test_a_change_decodes_only_the_entries_of_the_servers_and_services_it_ends():
    """Datapath.delete_flows: ending: both entries of each connection of an
    ended backend or service, or of an ended backend through an ended service
    (crossed), and no other entry, in the dump's order."""
    kept = [*connection(42000, backend_id=1), *connection(42001, backend_id=2)]
    of_server = connection(42002, backend_id=7)
    of_service = [r._replace(service_id=3) for r in connection(42003, backend_id=2)]
    rows = [kept[0], *of_server, kept[1], *of_service, *kept[2:]]
    assert flowtable.ending(*dump(*rows), {7}, {3}) == [*of_server, *of_service]
    assert flowtable.ending(*dump(*rows), {7}, set()) == list(of_server)
    assert flowtable.ending(*dump(*rows), set(), {3}) == of_service
    assert flowtable.ending(*dump(*rows), {5}, {9}) == []
    assert flowtable.ending(*dump(*rows), set(), set(), ({7, 2}, {3})) == of_service
    assert flowtable.ending(*dump(*rows), set(), set(), ({7}, {1})) == list(of_server)
    assert flowtable.ending(*dump(*rows), set(), set(), ({7}, set())) == []
    assert flowtable.ending(*dump(*kept, *of_server), {7}, set()) == list(of_server)   # last
    assert flowtable.ending(b"", b"", {7}, {3}) == []


def test_a_smaller_table_takes_whole_connections_open_ones_first():
    """What a flow table made smaller (`xlb up --flow-table`) copies: open
    connections before closing ones, each the most recently seen first, both
    entries or none; a reply entry without its forward entry last. The places
    come least wanted first, as the LRU would evict them."""
    older = connection(40030, seen_fwd=NOW - 50 * SEC, seen_reply=NOW - 40 * SEC)
    newer = connection(40031, seen_fwd=NOW - 30 * SEC, seen_reply=NOW - 30 * SEC)
    closing = connection(40032, state="closing")       # the newest of all
    lone_reply = connection(40033)[1]
    rows = [closing[1], lone_reply, older[0], newer[1], closing[0], older[1], newer[0]]
    keys, values = dump(*rows)

    def fitting(room):
        places, left = flowtable.fitting(keys, values, room)
        return [rows[i] for i in places], left

    assert fitting(4) == ([*older, newer[0], newer[1]], 1)
    assert fitting(5) == ([lone_reply, *older, newer[0], newer[1]], 1)
    assert fitting(3) == ([lone_reply, newer[0], newer[1]], 2)
    assert fitting(7) == ([lone_reply, closing[0], closing[1], *older, newer[0], newer[1]], 0)
    assert fitting(0) == ([], 3)
    # A connection is as recent as its later entry (older's and newer's agree
    # with their earlier ones): one whose server spoke last comes before newer.
    pushed = connection(40036, seen_fwd=NOW - 60 * SEC, seen_reply=NOW - 20 * SEC)
    assert flowtable.fitting(*dump(*newer, *pushed), 2) == ([2, 3], 1)


def test_a_forward_entry_without_its_reply_entry_is_taken_alone():
    """(The LRU evicts entries, not connections.) It is a connection, ranked
    by its own time, and takes one place."""
    alone = connection(40034)[0]
    whole = connection(40035, seen_fwd=NOW - 10 * SEC, seen_reply=NOW - 10 * SEC)
    rows = [whole[1], alone, whole[0]]
    keys, values = dump(*rows)
    assert flowtable.fitting(keys, values, 3) == ([2, 0, 1], 0)
    assert flowtable.fitting(keys, values, 2) == ([1], 1)


def test_the_servers_of_a_dump_are_the_sources_of_its_reply_entries():
    """A connection's server end, as a packet from it carries it (the address
    filter's key): its reply entry's source, never its client's."""
    other = int.from_bytes(IPv4Address("10.1.11.109").packed, "little")
    rows = [*connection(40000), *connection(40001)]
    rows[3] = rows[3]._replace(saddr=other)        # the second connection is another server's
    assert flowtable.servers(*dump(*rows)) == {(BACKEND, socket.htons(8080)),
                                               (other, socket.htons(8080))}
    assert flowtable.servers(b"", b"") == set()


def test_the_backends_of_a_dump_are_those_its_forward_entries_name():
    """Each id with the address and port that its connections' forward
    entries send to (a reply entry's are the client's)."""
    other = int.from_bytes(IPv4Address("10.1.11.109").packed, "little")
    rows = [*connection(40000), *connection(40001, backend_id=9)]
    rows[2] = rows[2]._replace(addr=other)
    assert flowtable.backends(*dump(*rows)) == {7: (BACKEND, socket.htons(8080)),
                                                9: (other, socket.htons(8080))}
    assert flowtable.backends(b"", b"") == {}
