#!/usr/bin/env bash
# From a fresh Debian machine to a served, load-balanced llama.cpp pool in one command:
# installs everything (scripts/setup.sh), starts a 4-node GPU Slurm cluster on this host, runs
# `hpcserve up` with examples/local.yaml (2 llama-server jobs with the real gemma3-270m model behind
# HAProxy on 127.0.0.1:8000), sends one chat completion through HAProxy, and shows the pool.
# With --webui it also starts OpenWebUI on http://127.0.0.1:8080, wired to the pool.
# The pool keeps running; stop it with: .venv/bin/hpcserve -f examples/local.yaml down
set -euo pipefail
cd "$(dirname "$0")/.."
webui=no
case "${1:-}" in
    --webui) webui=yes ;;
    "") ;;
    *) echo "usage: scripts/quickstart.sh [--webui]" >&2; exit 2 ;;
esac
scripts/setup.sh >/dev/null
scripts/local-slurm.sh start
eval "$(scripts/local-slurm.sh env)"
hpcserve=(.venv/bin/hpcserve -f examples/local.yaml)
"${hpcserve[@]}" up
status_json="$("${hpcserve[@]}" --json status)"
url="$(.venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["url"])' <<<"$status_json")"
key_file="$(.venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["auth"]["owner_key_file"])' <<<"$status_json")"
echo "POST $url/chat/completions (API key from $key_file)"
# The key goes to curl in a header file on its stdin, not on its command line (ps shows that to all).
printf 'Authorization: Bearer %s\n' "$(<"$key_file")" | curl -sS --fail-with-body "$url/chat/completions" \
    -H @- -H 'Content-Type: application/json' \
    -d '{"model": "gemma3-270m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24}'
echo
"${hpcserve[@]}" status
if [ "$webui" = yes ]; then
    "${hpcserve[@]}" webui
    browser="OpenWebUI is up (the line above): open it in a browser and sign in with that e-mail and password."
else
    browser="Chat in a browser: .venv/bin/hpcserve -f examples/local.yaml webui   (or scripts/quickstart.sh --webui)
starts OpenWebUI on http://127.0.0.1:8080 and prints the e-mail and password file to sign in with."
fi
cat <<MSG

The pool is up: point any OpenAI client at $url with the API key in $key_file
(export $(scripts/local-slurm.sh env | cut -d' ' -f2) first to use hpcserve by hand).
$browser
From another machine: ssh -L 8080:127.0.0.1:8080 $(hostname), then http://localhost:8080.
Stop everything with:
    .venv/bin/hpcserve -f examples/local.yaml webui --stop; .venv/bin/hpcserve -f examples/local.yaml down && scripts/local-slurm.sh stop
MSG
