"""The bench's table of issue 9's targets (netns-lab/bench.py): each ratio
judged against its target, and under each lab target the same ratio for
routing in XDP with no balancing, what forwarding alone reaches on the veths."""

from __future__ import annotations

from bench import print_targets

TEST_RUN = {"non-vip/empty": 1.10, "syn/before": 1.20, "established/before": 0.95}
LAB = {"xlb": "xlb, fast path", "udp/nft": 1.60, "close/direct": 0.90, "close/haproxy": 2.00,
       "xdp alone": {"udp/nft": 1.70, "close/direct": 0.80, "close/haproxy": 1.80}}


def rows(capsys) -> list[tuple[str, str | None]]:
    """(verdict, the routing-alone ratio printed under it or None) per target."""
    print_targets(TEST_RUN, LAB)
    lines = capsys.readouterr().out.splitlines()[1:]
    out = []
    for line in lines:
        if line.startswith("    lb routing in XDP"):
            out[-1] = (out[-1][0], line.split(": ")[1].split()[0])
        else:
            out.append(("not met" if line.endswith("not met") else "met", None))
    return out


def test_each_target_judged_by_its_direction(capsys):
    assert [verdict for verdict, _ in rows(capsys)] == [
        "met", "not met", "met",            # UDP >= 1.5, close/direct >= 1.0, close/HAProxy >= 1.9
        "met", "not met", "met"]            # non-VIP <= 1.15, new flow <= 1.0, established <= 1.0


def test_routing_alone_under_each_lab_target_only(capsys):
    assert [alone for _, alone in rows(capsys)] == ["1.70x", "0.80x", "1.80x", None, None, None]


def test_a_run_without_the_old_build_leaves_its_targets_out(capsys):
    print_targets({"non-vip/empty": 1.10}, LAB)
    out = capsys.readouterr().out
    assert "before the fast path" not in out and "non-VIP" in out
