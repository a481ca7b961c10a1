"""Capture real HAProxy runtime API answers for the replay tests (tests/unit/test_replay.py).

    .venv/bin/python tests/replay/capture_haproxy.py                       # the host's haproxy
    .venv/bin/python tests/replay/capture_haproxy.py --root /var/cache/hpcserve/roots/sid

Starts haproxy in master-worker mode (inside ROOT with chroot when given) with one backend of two
servers (maxconn 1 each) in front of a listener that accepts and never answers; opens three
requests (two in service, one queued), puts job2 in drain, reloads once (the old worker keeps its
streams), drains job2 in the new worker too, and writes the answers to `show proc`, `show stat` (the new worker, and the old one
through "@!PID"), `show servers state`, and the old worker's answers to `set server ... state
drain` and `set maxconn server` into tests/replay/haproxy-VERSION/. Needs root with
--root (chroot).
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from hpcserve.haproxy.runtime import command

HERE = Path(__file__).resolve().parent

CONFIG = """global
    stats socket {dir}/admin.sock mode 600 level admin
    hard-stop-after 60s
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout queue 120s
frontend api
    bind 127.0.0.1:{front}
    default_backend model_m
backend model_m
    balance leastconn
    server job1 127.0.0.1:{silent} maxconn 1 id 1
    server job2 127.0.0.1:{silent} maxconn 1 id 2
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a Debian root whose haproxy to run (chroot)")
    args = parser.parse_args()
    prefix = ["chroot", str(args.root)] if args.root else []
    version = re.search(r"version (\d+\.\d+\.\d+)", subprocess.run([*prefix, "haproxy", "-v"], capture_output=True,
                                                                   text=True, check=True).stdout).group(1)
    inside = Path("/tmp/hpcserve-capture")                     # as haproxy sees it
    outside = (args.root or Path("/")) / inside.relative_to("/")  # as this script sees it
    outside.mkdir(parents=True, exist_ok=True)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in iter(int, 1)], daemon=True).start()
    front = free_port()
    (outside / "haproxy.cfg").write_text(CONFIG.format(dir=inside, front=front, silent=silent.getsockname()[1]))
    for name in ("admin.sock", "master.sock"):
        (outside / name).unlink(missing_ok=True)
    haproxy = subprocess.Popen([*prefix, "haproxy", "-W", "-S", f"{inside}/master.sock", "-f", f"{inside}/haproxy.cfg"])
    try:
        for _ in range(100):
            if (outside / "admin.sock").exists() and (outside / "master.sock").exists():
                break
            time.sleep(0.1)
        clients = []
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", front))
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            clients.append(client)
        time.sleep(1)
        command(outside / "admin.sock", "set server model_m/job2 state drain")
        command(outside / "master.sock", "reload")
        time.sleep(2)
        command(outside / "admin.sock", "set server model_m/job2 state drain")    # the new worker's
        proc = command(outside / "master.sock", "show proc")
        old = re.search(r"^# old workers\n(\d+)", proc, re.MULTILINE)
        if not old:
            sys.exit(f"no old worker after the reload:\n{proc}")
        answers = {
            "show-proc.txt": proc,
            "show-stat-old-worker.txt": command(outside / "master.sock", f"@!{old.group(1)} show stat"),
            "show-stat.txt": command(outside / "admin.sock", "show stat"),
            "show-servers-state.txt": command(outside / "admin.sock", "show servers state"),
            # What a stopping worker answers to a change of one of its servers.
            "old-worker-set-server.txt": "".join(
                f"{line}\n{command(outside / 'master.sock', f'@!{old.group(1)} {line}')}"
                for line in ("set server model_m/job1 state drain", "set maxconn server model_m/job1 2")),
        }
        target = HERE / f"haproxy-{version}"
        target.mkdir(exist_ok=True)
        for name, text in answers.items():
            (target / name).write_text(text)
        print(f"wrote {', '.join(answers)} to {target}")
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=30)


if __name__ == "__main__":
    main()
