"""control/units.py: short numbers for narrow columns, counts, and values echoed."""

from xlb import units


def test_si_counts_below_1000_exactly_then_with_a_unit():
    assert [units.si(n) for n in (0, 7, 999, 1000, 1234, 3_400_000)] == \
        ["0", "7", "999", "1.0k", "1.2k", "3.4M"]
    assert [units.si(x) for x in (0.0, 7.46, 9.94, 10.0, 42.4, 999.4, 1000.0)] == \
        ["0", "7.5", "9.9", "10", "42", "999", "1.0k"]
    assert [units.si(n) for n in (999_949, 1_000_000)] == ["999.9k", "1.0M"]    # unit changes


def test_si_a_number_that_rounds_up_to_the_next_step_is_said_in_it():
    # Rounded as shown, 999,950 is 1000.0k: it is 1.0M, as 999.6 is 1.0k and 9.96 is 10.
    assert [units.si(n) for n in (999_950, 999_999, -999_999, 999_999_999)] == \
        ["1.0M", "1.0M", "-1.0M", "1.0G"]
    assert [units.si(x) for x in (999.6, 9.96, -9.96)] == ["1.0k", "10", "-10"]


def test_si_past_the_largest_unit_stays_in_it():
    # A 64-bit counter (bytes) can pass 1000P: still said in P, not an error.
    assert [units.si(n) for n in (10**15, 999_949 * 10**12, 2**64 - 1)] == \
        ["1.0P", "999.9P", "18446.7P"]


def test_count_is_exact_with_thousands_apart():
    assert [units.count(n) for n in (0, 999, 1000, 262_144, 2_500_000)] == \
        ["0", "999", "1,000", "262,144", "2,500,000"]


def test_full_is_the_tables_percentage():
    assert units.full({"entries": 250, "capacity": 1000}) == ("25.0", 25.0)
    assert units.full({"entries": 1, "capacity": 10_000}) == ("<0.1", 0.01)
    assert units.full({"entries": 1, "capacity": 1000}) == ("0.1", 0.1)
    assert units.full({"entries": 0, "capacity": 1000}) == ("0.0", 0.0)    # empty: not "<0.1"


def test_shown_escapes_what_would_break_a_line_or_a_terminal():
    assert units.shown("a\tb\nc\rd\x00\x1b[2J\x7f caf\u00e9") == \
        "a\\tb\\nc\\rd\\x00\\x1b[2J\\x7f caf\u00e9"
    # C1 controls (NEL, CSI), line and paragraph separators, bidirectional overrides
    assert units.shown("a\x85b\x9b31m\u2028c\u2029\u202ed\u2066") == \
        "a\\x85b\\x9b31m\\u2028c\\u2029\\u202ed\\u2066"
    # A file name's byte that is not UTF-8 (a lone surrogate): shown as that byte.
    assert units.shown("x\udcff\udc80\ud800") == "x\\xff\\x80\\ud800"


def test_a_value_quoted_shows_a_byte_that_was_not_utf8_as_that_byte():
    """As shown() shows it in the rest of the line: `--vip 10.1.1.101:\\xff: port
    '\\xff' is not a number`, not '\\udcff', which the operator never typed."""
    assert units.quoted("x\udcff\udc80") == "'x\\xff\\x80'"
    # a backslash typed before "udcff" is no surrogate; one before a surrogate is kept
    assert units.quoted("\\udcff") == "'\\\\udcff'"
    assert units.quoted("\\\udcff") == "'\\\\\\xff'"
    assert units.quoted("\ud800") == "'\\ud800'"


def test_last_check_shows_its_reason_on_one_line_that_any_terminal_prints():
    # A reason may carry a link's name ("link NAME lost its carrier"), which
    # the kernel lets hold an ESC or other control characters (no '/', ':' nor
    # whitespace): shown escaped, as `interfaces` shows link names, lest
    # `xlb status` (and `xlb top`) write a terminal's control sequence.
    # No check ran (mark_down): no duration.
    check = {"ok": False, "reason": "link e\x1b[2J\x85 lost its carrier", "duration_seconds": None}
    assert units.last_check({"monitor": "m", "last_check": check}) == \
        "link e\\x1b[2J\\x85 lost its carrier"
    assert units.last_check({"monitor": "m", "last_check": {
        "ok": True, "reason": "check passed", "duration_seconds": 0.0012}}) == \
        "check passed (1.2 ms)"


def test_a_long_value_is_echoed_as_its_first_characters_and_its_length():
    """A value of 100,000 characters made a message of 100 KB."""
    assert units.quoted("a" * units.LONG) == repr("a" * units.LONG)
    assert units.clipped("a" * units.LONG) == "a" * units.LONG
    assert units.quoted("b" * 100_000) == f"'{'b' * units.SHOWN}'... (100,000 characters)"
    assert units.clipped("/" + "c" * 100) == f"/{'c' * (units.SHOWN - 1)}... (101 characters)"
    assert units.clipped("d" * 101, lambda s: f"<{s}>") == \
        f"<{'d' * units.SHOWN}>... (101 characters)"
