"""The push store (sans-I/O): durable seqs, the push window, order after a restart, ACKs."""

from __future__ import annotations

import pytest

from protocols.tcp_pushes import PushOutbox


def test_window_limits_unacked_pushes_and_acks_make_room() -> None:
    pushes = PushOutbox(window=2)
    delivered: list[int] = []
    for seq in (5, 9, 12):  # outbox row ids: increasing, with gaps
        pushes.add_tracked("d", seq, b"p%d" % seq, delivered.append)
    assert pushes.reopen("d") == [(5, b"p5", False), (9, b"p9", False)]
    assert pushes.take_window("d") == []  # the window is full
    assert pushes.ack("d", 5) and delivered == [5]
    assert pushes.take_window("d") == [(12, b"p12", False)]
    assert not pushes.ack("d", 5)  # not outstanding any more: ignored
    assert pushes.backlog("d") == 2


def test_reconnect_resends_from_the_oldest_with_the_resend_flag() -> None:
    pushes = PushOutbox(window=10)
    pushes.add_tracked("d", 3, b"a", None)
    assert pushes.reopen("d") == [(3, b"a", False)]
    pushes.add_tracked("d", 4, b"b", None)
    assert pushes.reopen("d") == [(3, b"a", True), (4, b"b", False)]


def test_pushes_handed_over_again_after_a_restart_keep_seq_order() -> None:
    pushes = PushOutbox(window=10)
    pushes.add_tracked("d", 20, b"new", None)  # a turn of the new process ran first
    pushes.add_tracked("d", 7, b"old", None)  # then the outbox handed over an older one
    pushes.add_tracked("d", 7, b"old", None)  # ... twice: kept once
    assert [seq for seq, *_ in pushes.reopen("d")] == [7, 20]


def test_untracked_push_takes_the_seq_after_the_highest_seen() -> None:
    pushes = PushOutbox(window=10)
    pushes.add_tracked("d", 41, b"t", None)
    assert pushes.add("d", b"u") == 42
    assert pushes.add("other", b"x") == 1


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PushOutbox(window=0)
