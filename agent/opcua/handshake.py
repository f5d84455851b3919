"""The result handshake of one ROI on the OPC UA server: what a PLC program reads, and when the next result
may replace it. No OPC UA here (agent/opcua/server.py shows it): a small state machine a test drives.

Every prediction result of the ROI gets the next `ResultCounter` value (1, 2, ...). The ROI's result
variables show one result at a time, the *current* one, and `ResultCounter` is its number:

- with the handshake on (`opcua.handshake: true`, the default), a result becomes current only after the
  PLC wrote the current one's number to `ResultAck`; results that arrive meanwhile wait in order in a
  buffer of `opcua.result_buffer` (8 by default, as Cognex's In-Sight keeps 8). When the buffer is full,
  the oldest *waiting* result is dropped (never the current one, which the PLC may be reading) and
  `ResultsLost` counts it: the PLC sees a gap in ResultCounter and the count, never a silent skip;
- with the handshake off, every result becomes current at once (a client that only subscribes).

An ack of anything but the current number changes nothing (a late or repeated write is harmless).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Handshake:
    buffer: int = 8
    enabled: bool = True
    counter: int = 0  # the number of the last result handed out
    current: dict | None = None  # the result the variables show (its "counter" key: its number)
    acked: int = 0  # the last number the PLC acknowledged
    lost: int = 0
    waiting: deque[dict] = field(default_factory=deque)

    def push(self, result: dict) -> dict | None:
        """A new prediction result; returns it (numbered) when it becomes current now, else None."""
        self.counter += 1
        numbered = {**result, "counter": self.counter}
        if not self.enabled or self.current is None or self.acked >= self.current["counter"]:
            self.current = numbered
            return numbered
        self.waiting.append(numbered)
        if len(self.waiting) > self.buffer:
            self.waiting.popleft()
            self.lost += 1
        return None

    def ack(self, value: int) -> dict | None:
        """The PLC wrote `value` to ResultAck; returns the next result when one becomes current."""
        if self.current is None or value != self.current["counter"]:
            return None
        self.acked = value
        if self.waiting:
            self.current = self.waiting.popleft()
            return self.current
        return None

    @property
    def pending(self) -> int:
        return len(self.waiting)
