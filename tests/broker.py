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


def make_test_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=anomaly test CA",
        "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(cert))
    return ca, cert, key


class Broker:
    """secure=True: TLS with a test CA, no anonymous access, users from a password file, an ACL
    (`users`: name -> (password, topic rights lines)). The CA is at `self.ca` for clients."""

    def __init__(self, directory: Path, secure: bool = False,
                 users: dict[str, tuple[str, list[str]]] | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        # `user`: started as root, mosquitto would switch to the user 'mosquitto', which cannot write its
        # persistence file into our directory; sessions would then be lost across a broker restart
        conf = (f"listener {self.port} 127.0.0.1\npersistence true\n"
                f"persistence_location {self.dir}/\nmax_queued_messages 5000\nuser {getpass.getuser()}\n"
                # the default log types, plus subscriptions: a test can wait until a client is listening
                "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type subscribe\n")
        if not secure:
            conf += "allow_anonymous true\n"
        else:
            self.ca, server_cert, server_key = make_test_pki(self.dir / "pki")
            passwd, acl = self.dir / "passwd", self.dir / "acl"
            passwd.touch()
            lines = []
            for name, (password, rights) in (users or {}).items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), name, password], check=True,
                               capture_output=True)
                lines += [f"user {name}", *rights, ""]
            acl.write_text("\n".join(lines))
            conf += (f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
                     f"cafile {self.ca}\ncertfile {server_cert}\nkeyfile {server_key}\n")
        self.conf.write_text(conf)
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

    def subscribed(self, topic: str) -> bool:
        """Some client's subscription to `topic` reached the broker (its log)."""
        log = self.dir / "broker.log"
        return log.exists() and f" {topic}".encode() in log.read_bytes()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            log = (self.dir / "broker.log").read_text(errors="replace")
            assert "Error saving" not in log, f"the broker could not persist its sessions:\n{log[-1500:]}"
