"""control/units.py: short numbers for narrow columns."""

from xlb import units


def test_si_counts_below_1000_exactly_then_with_a_unit():
    assert [units.si(n) for n in (0, 7, 999, 1000, 1234, 3_400_000)] == \
        ["0", "7", "999", "1.0k", "1.2k", "3.4M"]
    assert [units.si(x) for x in (0.0, 7.46, 42.4, 999.4, 1000.0)] == \
        ["0", "7.5", "42", "999", "1.0k"]


def test_full_is_the_tables_percentage():
    assert units.full({"entries": 250, "capacity": 1000}) == ("25.0", 25.0)
    assert units.full({"entries": 1, "capacity": 10_000}) == ("<0.1", 0.01)
