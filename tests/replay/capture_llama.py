"""Capture a real llama-server's answers for the replay tests (tests/integration/test_llama_builds.py).

    .venv/bin/python tests/replay/capture_llama.py LLAMA_SERVER MODEL

Starts LLAMA_SERVER with the model (`-c 1024 -np 2 --metrics`, the key in LLAMA_API_KEY, as the
b10434 answers in tests/replay/llama-b10434 were captured on an AVX-512 machine), sends each request
of REQUESTS once it is ready and writes, for each, the answer as `curl -i` shows it (status line,
headers, blank line, body) into tests/replay/llama-bNUMBER/NAME.http, plus `--version`'s output into
version.txt. The folder is named after the build (hpcserve.llama.builds.parse_version).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hpcserve.llama import builds

HERE = Path(__file__).resolve().parent
KEY = "replay-capture-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
# file name -> (method, path, JSON body, headers)
REQUESTS: dict[str, tuple[str, str, dict | None, dict]] = {
    "health": ("GET", "/health", None, {}),
    "v1-models-nokey": ("GET", "/v1/models", None, {}),
    "v1-models-key": ("GET", "/v1/models", None, AUTH),
    "props-nokey": ("GET", "/props", None, {}),
    "props-key": ("GET", "/props", None, AUTH),
    "slots-key": ("GET", "/slots", None, AUTH),
    "metrics-key": ("GET", "/metrics", None, AUTH),
    "chat-nokey": ("POST", "/v1/chat/completions", CHAT, {}),
    "chat-key": ("POST", "/v1/chat/completions", CHAT, AUTH),
    "chat-n2-key": ("POST", "/v1/chat/completions", {**CHAT, "n": 2}, AUTH),
}


def as_curl(response: httpx.Response) -> str:
    head = [f"HTTP/1.1 {response.status_code} {response.reason_phrase}"]
    head += [f"{name}: {value}" for name, value in response.headers.multi_items()]
    return "\n".join(head) + "\n\n" + response.text


def main(server: str, model: str) -> None:
    version = subprocess.run([server, "--version"], capture_output=True, text=True)
    text = version.stdout + version.stderr
    build = builds.identify(text, Path(server))   # "build 0, commit unknown": the package names it
    if build is not None and "; PyPI " in build.reported:
        text += f"installed by: {build.reported.partition('; ')[2]}\n"
    if build is None or build.number is None:
        sys.exit(f"{server} --version names no known build: {text!r}")
    out = HERE / f"llama-b{build.number}"
    out.mkdir(exist_ok=True)
    (out / "version.txt").write_text(text)
    log = out.parent / f".capture-{build.number}.log"
    with open(log, "w") as sink:
        process = subprocess.Popen([server, "--model", model, "--host", "127.0.0.1", "--port", "0", "-c", "1024",
                                    "-np", "2", "--metrics"], stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "LLAMA_API_KEY": KEY})
    try:
        deadline, url = time.monotonic() + 120, None
        while time.monotonic() < deadline and url is None:
            match = re.search(r"listening on (http://[^ ]*:\d+)", log.read_text())
            url = match.group(1) if match else None
            time.sleep(0.1)
        assert url, log.read_text()
        while httpx.get(f"{url}/health").status_code != 200:
            time.sleep(0.1)
        for name, (method, path, body, headers) in REQUESTS.items():
            response = httpx.request(method, url + path, json=body, headers=headers, timeout=60)
            (out / f"{name}.http").write_text(as_curl(response))
    finally:
        process.terminate()
        process.wait(10)
        log.unlink()
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
