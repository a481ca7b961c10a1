#!/usr/bin/env bash
# The full stress grid (benchmarks/stress.py) on each HAProxy release: this host's (Debian 12:
# 2.6.12) and a Debian root per newer suite (trixie: 3.0.11, sid: 3.2.x; scripts/release-root.sh).
# Per release: the per-key limits, 1,000 bursts of 8 per case (max_concurrent 3 with fresh and
# long-lived keys, a rate of 3 per minute with fresh keys) at nbthread 1, 2 and 4 (about 15
# minutes), and the slots scenario, 30 runs of 200 streams through 20 pool changes and 10 reloads
# per balance policy (leastconn, affinity; about 2 minutes a run, 2 hours in all). The CI runs a
# sample (tests/integration/test_stress.py) and the 200-stream end-to-end test.
#
#   scripts/stress.sh                                    # host trixie sid, the full grid (~7 hours)
#   scripts/stress.sh trixie -- --bursts 300 --runs 0    # options after -- go to `benchmarks stress`
#
# Writes test-artifacts/stress-SUITE.json (every run's record) and prints each release's summary.
# Exit status: the number of releases with a violation or a failed request. Needs root for the
# Debian roots (as scripts/release-root.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
suites=() options=()
while [ "$#" -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; options=("$@"); break; fi
    suites+=("$1"); shift
done
[ "${#suites[@]}" -gt 0 ] || suites=(host trixie sid)
mkdir -p test-artifacts
failed=0
for suite in "${suites[@]}"; do
    out="test-artifacts/stress-$suite.json"
    printf 'stress: %s\n' "$suite" >&2
    if [ "$suite" = host ]; then
        scripts/setup.sh >/dev/null
        .venv/bin/python -m benchmarks stress --out "$out" "${options[@]}" || failed=$((failed + 1))
    else
        scripts/release-root.sh shell "$suite" /opt/hpcserve-venv/bin/python -m benchmarks stress \
            --out "$out" "${options[@]}" || failed=$((failed + 1))
    fi
done
exit "$failed"
