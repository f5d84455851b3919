"""The OPC UA result handshake's state machine (agent/opcua/handshake.py), driven directly: a PLC that
acks each result sees every one once in order; a slow one sees the newest `buffer` and a count of the lost."""

from __future__ import annotations

from agent.opcua.handshake import Handshake


def test_a_plc_that_acks_sees_every_result_once_in_order() -> None:
    h = Handshake(buffer=8)
    shown = []
    for i in range(1, 21):
        now = h.push({"id": i})
        if now is not None:
            shown.append(now)
        if i % 3 == 0:  # the PLC acks in its own rhythm, each result it read
            while h.current is not None and h.acked < h.current["counter"]:
                nxt = h.ack(h.current["counter"])
                if nxt is not None:
                    shown.append(nxt)
    while h.current is not None and h.acked < h.current["counter"]:
        nxt = h.ack(h.current["counter"])
        if nxt is not None:
            shown.append(nxt)
    assert [r["id"] for r in shown] == list(range(1, 21)) and [r["counter"] for r in shown] == list(range(1, 21))
    assert h.lost == 0 and h.pending == 0


def test_past_the_buffer_the_oldest_waiting_result_is_dropped_and_counted() -> None:
    h = Handshake(buffer=3)
    assert h.push({"id": 1})["counter"] == 1
    for i in range(2, 8):
        assert h.push({"id": i}) is None  # the PLC has not acked 1: they wait
    assert h.pending == 3 and h.lost == 3 and h.current["id"] == 1  # the current one is never dropped
    assert h.ack(2) is None and h.current["id"] == 1  # a wrong number changes nothing
    assert [h.ack(n)["id"] for n in (1, 5, 6)] == [5, 6, 7]
    assert h.ack(7) is None and h.pending == 0
    assert h.push({"id": 8})["counter"] == 8  # acked: the next result is current at once


def test_without_the_handshake_every_result_is_current_at_once() -> None:
    h = Handshake(buffer=1, enabled=False)
    assert [h.push({"id": i})["counter"] for i in range(1, 6)] == [1, 2, 3, 4, 5] and h.lost == 0
