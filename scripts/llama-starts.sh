#!/usr/bin/env bash
# scripts/llama-starts.sh SERVER MODEL: exit 0 when the llama-server SERVER loads MODEL and listens
# within 60 s on this machine (a build for another CPU dies with SIGILL while loading the model,
# after `--version` has answered fine). Used by scripts/setup.sh and scripts/matrix.sh.
set -uo pipefail
server="$1" model="$2"
log="$(mktemp)"
"$server" --model "$model" --host 127.0.0.1 --port 0 --threads 1 --ctx-size 256 >"$log" 2>&1 &
pid=$! ok=1
for _ in $(seq 1 120); do
    if grep -q "listening on http" "$log"; then ok=0; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
done
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -f "$log"
exit "$ok"
