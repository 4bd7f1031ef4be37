"""`make demo`: the whole system on local defaults, with no manual step.

A fresh CA, a fleet registered from a generated asset list, the EST server, a
private mosquitto on a free loopback port, the MQTT gateway (registered with
`gateway add`, set up in its own directory with `gateway init`), and a mixed fleet
of simulated devices (a third of them intermittently offline, a few on old
firmware) for about a minute. Half-way one device is decommissioned; the
summary shows its peers saw it revoked. Every process it starts, it stops.

Usage: python -m cli.demo [--dir demo-data] [--devices 200] [--duration 60s]
"""
from __future__ import annotations

import argparse
import csv
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ca.timefmt import parse_duration
from firmware_sim.connectivity import MODELS

MARKER = ".iomtca-demo"
REVOKED_DEVICE = "sim-00005"
DEMO_OPERATOR = "demo-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The processes the demo started: each is stopped at the end, whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], ready: str | None = None, timeout: float = 30) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if ready else log, stderr=log, text=True)
        self.running.append((name, proc))
        if ready:
            line = _read_line(proc, timeout)
            if ready not in line:
                raise SystemExit(f"demo: {name} did not start (see {self.logs / (name + '.log')}): {line!r}")
            threading.Thread(target=lambda: [log.write(l) for l in proc.stdout], daemon=True).start()
        return proc

    def stop_all(self) -> None:
        for name, proc in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: nothing listens on 127.0.0.1:{port}")


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(argv[:1] and [Path(argv[0]).name] + argv[1:]), flush=True)
    return subprocess.run(argv, check=True, text=True, **kw)


def write_assets(path: Path, devices: int) -> None:
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["device_id", "model", "owner", "location", "criticality", "firmware", "manufacturer"])
        for i in range(1, devices + 1):
            model = MODELS[(i - 1) % len(MODELS)]
            criticality = "high" if model == "ventilator" else ("low" if model == "imaging-ct" else "medium")
            # every 10th MQTT device (even numbers) runs old firmware: refused renewal until it upgrades
            firmware = "1.0.0" if i % 20 == 10 else "2.0.0"
            out.writerow([f"sim-{i:05d}", model, "Biomedical Engineering", f"ward {(i - 1) // 10 + 1}",
                          criticality, firmware, "Simulated Devices Inc"])


def configure(config: Path) -> None:
    """Demo lifetimes: renewal, expiry and the grace path all happen within a minute."""
    text = config.read_text()
    text = text.replace('renewal_grace = "7d"', 'renewal_grace = "20s"')
    text = text.replace('[ca.profiles.device]\nlifetime = "3d"', '[ca.profiles.device]\nlifetime = "30s"')
    models = "".join(f'[ca.models."{m}"]\nmin_firmware = "2.0.0"\n\n' for m in MODELS)
    text = text.replace("[storage]", models + "[storage]")
    config.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("demo-data"))
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--duration", default="60s")
    parser.add_argument("--final-sync", default="20s")
    args = parser.parse_args(argv)
    data = args.dir.resolve()
    if data.exists():
        if not (data / MARKER).exists():
            raise SystemExit(f"demo: {data} exists and was not made by the demo; choose another --dir")
        shutil.rmtree(data)
    (data / "logs").mkdir(parents=True)
    (data / MARKER).write_text("made by make demo; deleted by the next run\n")
    home = data / "ca"
    iomtca = str(Path(sys.executable).with_name("iomtca"))
    est_port, http_port, mqtt_port, console_port = free_port(), free_port(), free_port(), free_port()
    est, broker = f"https://127.0.0.1:{est_port}", f"mqtt://127.0.0.1:{mqtt_port}"
    procs = Processes(data / "logs")
    try:
        print("== 1. a fresh CA (demo lifetimes: 30 s certificates, 20 s renewal grace)", flush=True)
        run([iomtca, "init", "--dir", str(home), "--trust-domain", "demo-hospital.test",
             "--base-url", f"http://127.0.0.1:{http_port}"], stdout=subprocess.DEVNULL)
        configure(home / "config.toml")
        print(f"== 2. onboard {args.devices} devices from an asset list", flush=True)
        write_assets(data / "assets.csv", args.devices)
        run([iomtca, "device", "import", str(data / "assets.csv"), "--tokens-out", str(data / "tokens.csv"),
             "--dir", str(home)])
        print("== 3. start mosquitto, the enrollment server and the gateway", flush=True)
        (data / "broker").mkdir()
        (data / "broker" / "mosquitto.conf").write_text(
            f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\nmax_queued_messages 10000\n")
        procs.start("mosquitto", ["mosquitto", "-c", str(data / "broker" / "mosquitto.conf")])
        wait_for_port(mqtt_port)
        procs.start("server", [iomtca, "serve", "--dir", str(home), "--listen", f"127.0.0.1:{est_port}",
                               "--http-listen", f"127.0.0.1:{http_port}", "--console-listen",
                               f"127.0.0.1:{console_port}"], ready="listening")
        # a demo operator for the web console (the password on stdin, never on a command line)
        console_password = secrets.token_urlsafe(12)
        run([iomtca, "operator", "add", DEMO_OPERATOR, "--role", "admin", "--password-stdin", "--dir", str(home)],
            input=console_password + "\n", stdout=subprocess.DEVNULL)
        login_file = data / "console-login.txt"
        login_file.write_text(f"https://127.0.0.1:{console_port}/\n{DEMO_OPERATOR}\n{console_password}\n")
        login_file.chmod(0o600)
        print(f"   console: https://127.0.0.1:{console_port}/  log in as {DEMO_OPERATOR} / {console_password} "
              f"(the server certificate is issued by {home / 'root.pem'})", flush=True)
        print("== 3b. register the gateway at the CA, set it up in its own directory, run it", flush=True)
        gwdir = data / "gateway"
        added = json.loads(run([iomtca, "gateway", "add", "ward-gw", "--json", "--dir", str(home)],
                               capture_output=True).stdout)
        # the token on stdin, never on the command line; the gateway makes its key on its own host
        run([iomtca, "gateway", "init", "--dir", str(gwdir), "--ca", est, "--root", str(home / "root.pem"),
             "--name", "ward-gw", "--token", "-", "--broker", broker], input=added["token"] + "\n",
            stdout=subprocess.DEVNULL)
        with open(gwdir / "gateway.toml", "a") as fh:   # demo pace: quick sweeps and retries
            fh.write('sweep_every = "2s"\nretry_every = "1s"\n')
        procs.start("gateway", [iomtca, "gateway", "run", "--dir", str(gwdir)], ready="connected")
        duration = parse_duration(args.duration).total_seconds()
        print(f"== 4. run the fleet for {args.duration}; {REVOKED_DEVICE} is decommissioned half-way", flush=True)
        sim = procs.start("sim", [iomtca, "sim", "--dir", str(home), "--devices", str(args.devices),
                                  "--transport", "mixed", "--offline-ratio", "0.33", "--duration", args.duration,
                                  "--final-sync", args.final_sync, "--est", est, "--broker", broker,
                                  "--tokens", str(data / "tokens.csv"), "--json-out", str(data / "summary.json")])
        time.sleep(duration / 2)
        run([iomtca, "device", "decommission", REVOKED_DEVICE, "--dir", str(home)])
        code = sim.wait(timeout=duration + parse_duration(args.final_sync).total_seconds() + 120)
        print((data / "logs" / "sim.log").read_text().split("fleet:", 1)[-1].join(["fleet:", ""]), flush=True)
        summary = json.loads((data / "summary.json").read_text())
        seen = REVOKED_DEVICE in summary["final"]["revoked_seen_by_peers"]
        print(f"== 5. {REVOKED_DEVICE} revoked half-way: its ward peers {'SAW' if seen else 'did NOT see'} "
              "it revoked (verified OCSP over HTTP or the retained MQTT response)")
        print(f"\ndata: {data}\n  CA directory and database: {home}\n  gateway directory (no CA key): "
              f"{data / 'gateway'}\n  device folders (keys, certificates): "
              f"{home / 'sim'}\n  logs: {data / 'logs'}\n  summary: {data / 'summary.json'}\n"
              f"  console login (while the demo runs): {data / 'console-login.txt'}")
        return 0 if code == 0 and seen else 1
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
