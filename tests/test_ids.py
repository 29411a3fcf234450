"""Checkpoint ids and keys: the order without clocks (ids.py) and strict key checks."""
from __future__ import annotations

import pytest

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import ids
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import (
    CheckpointFormatError,
    CheckpointUntrusted,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import parse_key
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.signing import Sealer

KEY = "F/1/train/2/root/a001-000000007-20260101T000000Z-0123abcd"


def test_within_a_task_a_later_attempt_is_newer_whatever_its_clock_said():
    """Attempt first, then the logical clock; the creation second in the id plays no part."""
    early_clock_late_attempt = "a002-000000001-20200101T000000Z-00000000"
    late_clock_early_attempt = "a001-000000009-20990101T000000Z-00000000"
    old_format = "20990101T000000000000Z-a1-0123abcd"
    order = sorted([early_clock_late_attempt, late_clock_early_attempt, old_format], key=ids.task_order)
    assert order == [old_format, late_clock_early_attempt, early_clock_late_attempt]


def test_a_process_ticks_past_every_id_it_has_seen():
    """After seeing another run's id, the next id of this process is newer across runs."""
    seen = f"a000-{10**12:09d}-20200101T000000Z-00000000"
    ids.observe([seen])
    mine, _ = ids.new_id(0)
    assert ids.run_order(mine, "1") > ids.run_order(seen, "2")


def test_keys_with_a_trailing_newline_or_dot_dot_are_refused_and_old_keys_still_parse():
    """A key is matched whole: "\\n" at the end of any part, or "..", is not a key."""
    assert parse_key(KEY)[1] == KEY.rsplit("/", 1)[1]
    assert parse_key("F/1/train/2/root/20260101T000000000000Z-a0-0123abcd")[0].task == "2"
    for bad in (KEY + "\n", KEY.replace("train", "train\n"), KEY.replace("train", "..")):
        with pytest.raises(CheckpointFormatError):
            parse_key(bad)


def test_seal_messages_name_the_secret_variable_even_when_read_once(monkeypatch):
    """A sealer that read the environment once still names $METAFLOW_IMPLICIT_CHECKPOINT_SECRET."""
    monkeypatch.setenv("METAFLOW_IMPLICIT_CHECKPOINT_SECRET", "s3cret")
    sealer = Sealer().fixed()
    with pytest.raises(CheckpointUntrusted) as caught:
        sealer.verify(b"x", Sealer(secret=None, env=None).seal(b"x"), "memory://m")
    assert "$METAFLOW_IMPLICIT_CHECKPOINT_SECRET is set" in str(caught.value)
    assert "$None" not in str(caught.value)
