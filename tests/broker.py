"""A real Mosquitto broker per test, on a free loopback port, with its own config and persistence."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and os.path.exists(cand):
            return cand
    msg = "mosquitto not installed (apt-get install mosquitto; .ci/run does it)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)
    raise AssertionError  # unreachable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        # `user`: started as root, mosquitto would switch to the user 'mosquitto', which cannot write its
        # persistence file into our directory; sessions would then be lost across a broker restart
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {self.dir}/\nmax_queued_messages 5000\n"
                             f"user {getpass.getuser()}\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "broker.log", "ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            log = (self.dir / "broker.log").read_text(errors="replace")
            assert "Error saving" not in log, f"the broker could not persist its sessions:\n{log[-1500:]}"
