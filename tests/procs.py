"""Subprocess helpers shared by the tests that run the real broker, server, gateway and simulator.

Every wait is bounded; every process is stopped by its own pid (SIGTERM, then SIGKILL), never
by name. Each process writes its stderr to a file, shown when a test that used it fails.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

UNSET_ENV = ("IOMTCA_PASSPHRASE", "IOMTCA_HOME", "IOMTCA_GATEWAY_HOME", "IOMTCA_GATEWAY_PASSPHRASE", "IOMTCA_GATEWAY_TOKEN")

# Everything started through Proc, for the failure report and the last-resort clean-up.
PROCESSES: list["Proc"] = []


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in UNSET_ENV}
    e["LC_ALL"] = "C"
    return e


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, *, timeout: float = 60, check: bool = True, input: bytes | None = None,
        cwd: Path | None = None, text: bool = False) -> subprocess.CompletedProcess:
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=env(), input=input, cwd=cwd, text=text)
    if check and proc.returncode != 0:
        out, err = (proc.stdout, proc.stderr) if text else (proc.stdout.decode(errors="replace"),
                                                            proc.stderr.decode(errors="replace"))
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                             f"--- stdout\n{out}\n--- stderr\n{err}")
    return proc


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A long-running subprocess: stdout read line by line (for its ready line), stderr to a file."""

    def __init__(self, name: str, argv: list, log_dir: Path) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_dir = log_dir
        self.popen: subprocess.Popen | None = None
        self.stderr_path: Path | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout_text: list[str] = []
        self.starts = 0

    def start(self, ready: re.Pattern | None = None, timeout: float = 20) -> re.Match | None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is already running"
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = self.log_dir / f"{self.name}-{self.starts}.stderr.log"
        with open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err, env=env(),
                                          cwd=self.log_dir, start_new_session=True)
        self.lines = queue.Queue()
        PROCESSES.append(self)
        threading.Thread(target=self._pump, args=(self.popen, self.lines), daemon=True).start()
        if ready is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
            except queue.Empty:
                line = None
            if line is not None and (match := ready.search(line)):
                return match
            if self.popen.poll() is not None and self.lines.empty():
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before it was ready:\n"
                                     f"{self.stderr_tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} not ready within {timeout}s:\n{self.stderr_tail()}")

    def _pump(self, popen: subprocess.Popen, lines: queue.Queue) -> None:
        for raw in popen.stdout:
            text = raw.decode(errors="replace").rstrip("\n")
            self.stdout_text.append(text)
            lines.put(text)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float) -> int:
        """The exit status; a process still running after `timeout` is stopped and fails the test."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.name} did not finish within {timeout:.0f}s:\n{self.stderr_tail()}")

    def stop(self, grace: float = 5) -> float:
        """SIGTERM, then SIGKILL after `grace` seconds; returns how long the process took to exit."""
        if not self.alive:
            return 0.0
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.alive:
            self.popen.kill()
            self.popen.wait(10)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""
        except FileNotFoundError:
            return ""

    def stderr_tail(self, chars: int = 6000) -> str:
        return self.stderr_text()[-chars:]


def failure_sections(first: int) -> list[tuple[str, str]]:
    """Report sections with the stderr of the processes a failed test used: those started since
    index `first` of PROCESSES, and any still running."""
    sections, seen = [], set()
    for index, proc in enumerate(PROCESSES):
        if (index >= first or proc.alive) and proc.stderr_path not in seen:
            seen.add(proc.stderr_path)
            sections.append((f"{proc.name} stderr ({proc.stderr_path})", proc.stderr_tail()))
    return sections
