"""The outbox is the gateway's promise: nothing is lost between the meter and the broker's PUBACK."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge.outbox import Outbox, OutboxError
from edge.wire import Batch
from tests.helpers import make_batch


def builder(**kw: object):  # type: ignore[no-untyped-def]
    return lambda seq: make_batch(seq, **kw)  # type: ignore[arg-type]


def test_pending_batches_and_sequence_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "gw" / "outbox.sqlite"
    with Outbox(path, "gw-sz1-01") as box:
        stored = [box.enqueue(builder()) for _ in range(3)]
        assert [b.seq for b in stored] == [0, 1, 2]
        assert box.ack(1)
        assert not box.ack(1)  # a duplicate PUBACK is harmless
    with Outbox(path, "gw-sz1-01") as box:
        pending = box.pending()
        assert [p.seq for p in pending] == [0, 2]
        assert [Batch.decode(p.payload) for p in pending] == [stored[0], stored[2]]
        assert pending[0].n_readings == len(stored[0].readings)
        assert box.enqueue(builder()).seq == 3
        assert box.ack(0) and box.ack(2) and box.ack(3)
        assert box.count() == 0
    # The sequence keeps increasing after the outbox emptied: it is not derived from the rows.
    with Outbox(path, "gw-sz1-01") as box:
        assert box.pending() == []
        assert box.enqueue(builder()).seq == 4


def test_pending_pages_after_a_sequence(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", "gw") as box:
        for _ in range(5):
            box.enqueue(builder(gateway="gw"))
        assert [p.seq for p in box.pending(after=1, limit=2)] == [2, 3]
        assert [p.seq for p in box.pending(after=3)] == [4]


def test_is_wal_and_the_payload_is_on_disk_before_publish(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = Outbox(path, "gw-sz1-01")
    batch = box.enqueue(builder())
    # A second, independent connection (another process after a crash) sees the committed batch.
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT payload FROM outbox WHERE seq = 0").fetchone()[0] == batch.encode()
    other.close()
    box.close()


def test_failed_build_consumes_no_sequence(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", "gw-sz1-01") as box:

        def broken(seq: int) -> Batch:
            raise ValueError("meter returned garbage")

        with pytest.raises(ValueError, match="garbage"):
            box.enqueue(broken)
        with pytest.raises(OutboxError, match="expected 0"):
            box.enqueue(lambda seq: make_batch(seq + 7))
        assert box.count() == 0
        assert box.enqueue(builder()).seq == 0


def test_bound_drops_oldest_and_counts_it(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", "gw-sz1-01", max_batches=2) as box:
        for _ in range(4):
            box.enqueue(builder(meters=1, steps=2))
        assert [p.seq for p in box.pending()] == [2, 3]
        assert (box.dropped_batches, box.dropped_readings) == (2, 4)


def test_an_outbox_belongs_to_one_gateway(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    Outbox(path, "gw-sz1-01").close()
    with pytest.raises(OutboxError, match="belongs to gateway 'gw-sz1-01'"):
        Outbox(path, "gw-other")
