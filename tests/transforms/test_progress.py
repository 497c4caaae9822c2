"""Progress lines: steady, and saying rows, share, rate and time."""

import logging

from transforms.progress import Progress, describe


def test_describe_gives_rows_share_rate_and_time():
    line = describe("Fit", 1_000_000, 8_000_000, 4.0)

    assert line == "Fit: 1,000,000 of 8,000,000 rows (12.5%), 250,000 rows/s, 4 s"


def test_describe_without_a_total_leaves_the_share_out():
    assert describe("Fit", 0, 0, 0.0) == "Fit: 0 of 0 rows, 0 rows/s, 0 s"


def test_progress_logs_no_more_often_than_asked(caplog):
    caplog.set_level(logging.INFO, logger="transforms.progress")
    often = Progress("Fit", 100, every_s=0.0)
    rarely = Progress("Transform", 100, every_s=3600.0)

    for _ in range(4):
        often.add(25)
        rarely.add(25)

    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[-1].startswith("Fit: 100 of 100 rows (100.0%)")
