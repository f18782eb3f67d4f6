"""`range_requests`: the fewest runs covering what each connection wants, a run's partitions being a rectangle of
consecutive connections (in config order) × one range of days, so no run takes in a connection or a day it should
not."""

from types import SimpleNamespace

from expensify_exact.defs.partitions import range_requests

CONFIG = SimpleNamespace(connections=[SimpleNamespace(name=n) for n in ("a", "b", "c", "d", "e")])


def test_consecutive_connections_wanting_the_same_days_share_one_run():
    wanted = {"a": ("2026-11-20", "2026-11-20"), "b": ("2026-11-20", "2026-11-20"), "c": ("2026-11-20", "2026-11-20")}
    assert range_requests(CONFIG, wanted) == [("a", "c", "2026-11-20", "2026-11-20", ["a", "b", "c"])]


def test_a_connection_wanting_other_days_or_nothing_splits_the_range():
    wanted = {"a": ("2026-11-18", "2026-11-20"), "b": ("2026-11-18", "2026-11-20"), "c": ("2026-11-19", "2026-11-20"),
              "e": ("2026-11-19", "2026-11-20")}  # d wants nothing: c and e are no neighbours
    assert range_requests(CONFIG, wanted) == [("a", "b", "2026-11-18", "2026-11-20", ["a", "b"]),
                                              ("c", "c", "2026-11-19", "2026-11-20", ["c"]),
                                              ("e", "e", "2026-11-19", "2026-11-20", ["e"])]


def test_config_order_counts_not_the_order_asked_in_and_unknown_names_are_left_out():
    wanted = {"b": ("2026-11", "2026-11"), "a": ("2026-11", "2026-11"), "zz": ("2026-11", "2026-11")}
    assert range_requests(CONFIG, wanted) == [("a", "b", "2026-11", "2026-11", ["a", "b"])]
    assert range_requests(CONFIG, {}) == []
