"""A real systemd (the distribution's /lib/systemd/systemd) as PID 1 of a private PID and mount
namespace, to run the shipped unit file's service semantics (Type=notify, WatchdogSec, Restart) in a
test. Needs root and util-linux `unshare`; nothing of the host is managed by it:

- /run is a fresh tmpfs inside the namespace (the units live in /run/systemd/system), the hostname is
  its own (UTS namespace), and `container=` tells systemd it is in a container;
- the test target and its units have DefaultDependencies=no, so sysinit.target (tmpfiles cleaning of
  /tmp, udev, journald) is never pulled in; output goes to files, not the journal;
- `unshare --kill-child` and `stop()` end the whole namespace with its PID 1.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
TARGET = "anomaly-test.target"

BOOT = """#!/bin/sh
set -e
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system
cp "$1"/* /run/systemd/system/
export container=anomaly-agent-test   # systemd then skips the hardware and host set-up a container must not do
exec {systemd} --system --unit={target} --log-level=info --show-status=false
"""


def available() -> str | None:
    """None when a private systemd can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (PID and mount namespaces)"
    if not SYSTEMD.exists() or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs systemd and util-linux unshare/nsenter"
    return None


def service_from_shipped(unit_file: Path, exec_start: str, overrides: dict[str, str], env: dict[str, str],
                         log: Path, stops: Path) -> str:
    """The shipped unit's [Service] lifecycle keys (Type, NotifyAccess, WatchdogSec, Restart,
    RestartSec, KillSignal, TimeoutStopSec) with `overrides`, a test ExecStart and environment.
    User/Group and the sandboxing keys are left out: the test runs as root in a throw-away tree.
    Each stop of the service appends systemd's verdict to `stops`: "$SERVICE_RESULT $EXIT_CODE
    $EXIT_STATUS" (e.g. "watchdog dumped ABRT"), the variables systemd gives ExecStopPost."""
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(unit_file.read_text())
    svc = cp["Service"]
    keep = ("Type", "NotifyAccess", "WatchdogSec", "Restart", "RestartSec", "KillSignal", "TimeoutStopSec")
    lines = [f"{k}={overrides.get(k, svc[k])}" for k in keep if k in svc]
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in keep]
    lines += [f'Environment="{k}={v}"' for k, v in env.items()]
    return "\n".join(["[Unit]", "Description=anomaly-agent under test", "DefaultDependencies=no", "",
                      "[Service]", f"ExecStart={exec_start}", *lines,
                      f"StandardOutput=append:{log}", f"StandardError=append:{log}",
                      f"ExecStopPost=/bin/sh -c 'echo \"$$SERVICE_RESULT $$EXIT_CODE $$EXIT_STATUS\" >> {stops}'", ""])


class PrivateSystemd:
    """systemd in its own namespaces, started with one service (name -> unit text) wanted by its target."""

    def __init__(self, workdir: Path, units: dict[str, str]) -> None:
        self.dir = workdir
        self.units_dir = workdir / "units"
        self.units_dir.mkdir(parents=True, exist_ok=True)
        wants = " ".join(units)
        (self.units_dir / TARGET).write_text(f"[Unit]\nDescription=test target\nDefaultDependencies=no\n"
                                             f"Wants={wants}\n")
        for name, text in units.items():
            (self.units_dir / name).write_text(text)
        self.boot = workdir / "boot.sh"
        self.boot.write_text(BOOT.format(systemd=SYSTEMD, target=TARGET))
        self.boot.chmod(0o755)
        self.console = workdir / "unshare.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateSystemd:
        self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--uts",
                                      "--propagation", "private", str(self.boot), str(self.units_dir)],
                                     stdin=subprocess.DEVNULL, stdout=open(self.console, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def pid1(self) -> int | None:
        """Host PID of the namespace's systemd (the child of unshare)."""
        if self.proc is None:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def systemctl(self, *args: str) -> str:
        pid = self.pid1()
        assert pid is not None, "the private systemd is not running"
        r = subprocess.run(["nsenter", "-t", str(pid), "-m", "-p", "systemctl", *args], capture_output=True,
                           text=True, timeout=30)
        return r.stdout + r.stderr

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self) -> None:
        if self.proc is None:
            return
        pid = self.pid1()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)  # PID 1 of the namespace: every process in it goes too
        try:
            self.proc.wait(timeout=10)  # unshare reaps its child and exits
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
