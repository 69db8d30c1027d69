"""Rings of backend ids: pure functions, no kernel."""

from collections import Counter

import pytest

from xlb import scheduler


def test_round_robin_keeps_pool_order():
    assert scheduler.ring("roundrobin", [(7, 1), (3, 5), (9, 1)], 1024) == [7, 3, 9]


def test_smooth_weighted_matches_nginx_sequence():
    # nginx's documented example: weights 5, 1, 1 give a a b a c a a.
    assert scheduler.smooth_weighted([(0, 5), (1, 1), (2, 1)], 1024) == [0, 0, 1, 0, 2, 0, 0]


def test_weighted_ring_proportions_and_gcd():
    ring = scheduler.ring("weighted", [(1, 300), (2, 100)], 1024)
    assert ring == [1, 1, 2, 1]          # reduced by the gcd, spread out


def test_weighted_scaled_to_ring_size():
    ring = scheduler.smooth_weighted([(1, 1000), (2, 1), (3, 500)], 64)
    counts = Counter(ring)
    assert len(ring) <= 64 and counts[2] == 1
    assert abs(counts[1] / counts[3] - 2) < 0.1


def test_zero_weight_is_left_out():
    assert scheduler.smooth_weighted([(1, 0), (2, 3)], 16) == [2]
    assert 1 not in scheduler.smooth_weighted([(1, 0), (2, 1000), (3, 501)], 16)  # scaled


def test_scaling_down_keeps_every_server_in_the_ring():
    """Three servers of weight 1 beside one of 100 in a ring of 4: scaled, the
    light ones stay at 1 and the heavy one gives up what overshoots."""
    assert sorted(scheduler.smooth_weighted([(0, 1), (1, 1), (2, 1), (3, 100)], 4)) == \
        [0, 1, 2, 3]


def test_the_readmes_pool_whose_weights_its_ring_cannot_hold():
    """README: 1,000 servers of weight 1 and 20 of weight 256 in a ring of
    1,024 slots: the heavy ones take 2% of new flows, not 84%."""
    ring = scheduler.ring("weighted", [(i, 1) for i in range(1000)]
                          + [(1000 + i, 256) for i in range(20)], 1024)
    assert round(100 * sum(i >= 1000 for i in ring) / len(ring)) == 2
    assert round(100 * 20 * 256 / (1000 + 20 * 256)) == 84


def test_too_many_backends_for_the_ring():
    with pytest.raises(ValueError, match="do not fit"):
        scheduler.ring("roundrobin", [(i, 1) for i in range(5)], 4)
    with pytest.raises(ValueError, match="do not fit"):
        scheduler.ring("weighted", [(i, 1) for i in range(5)], 4)


def nginx_reference(weighted):
    """nginx's smooth weighted round-robin, step by step, for comparison."""
    current = [0] * len(weighted)
    total = sum(w for _, w in weighted)
    out = []
    for _ in range(total):
        for k, (_, w) in enumerate(weighted):
            current[k] += w
        best = max(range(len(weighted)), key=lambda k: current[k])
        current[best] -= total
        out.append(weighted[best][0])
    return out


@pytest.mark.parametrize("weighted", [
    [(5, 1), (3, 1), (9, 1)],            # equal: the shortcut
    [(5, 2), (3, 2), (9, 3)],
    [(0, 4), (1, 3), (2, 2), (3, 1)],
    [(7, 1), (8, 5)],
])
def test_smooth_weighted_is_nginx(weighted):
    assert scheduler.smooth_weighted(weighted, 1024) == nginx_reference(weighted)
