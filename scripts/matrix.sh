#!/usr/bin/env bash
# The version matrix: hpcserve's release tests (scripts/release-root.sh: the Slurm and HAProxy
# integration tests, the unit tests, and two end-to-end tests with the real llama-server) on this
# host's Slurm and HAProxy and in a Debian root per newer suite, then one table.
#
#   scripts/matrix.sh                 # host, trixie, sid (about 30 minutes on 2 cores, roots cached)
#   scripts/matrix.sh host trixie     # some of them
#
# Prints a Markdown table (suite, Slurm, HAProxy, Python, result, minutes) and writes it to
# test-artifacts/matrix.md; each run's JUnit file lies beside it. Exit status: the number of
# suites that failed. Needs root (as scripts/release-root.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
suites=("$@"); [ "${#suites[@]}" -gt 0 ] || suites=(host trixie sid)
mkdir -p test-artifacts
rows=() failed=0
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$versions"; }   # field NAME: from "slurm=24.11.5 haproxy=..."

for suite in "${suites[@]}"; do
    junit="test-artifacts/matrix-$suite.xml"
    rm -f "$junit"
    started=$(date +%s)
    printf 'matrix: %s\n' "$suite" >&2
    versions="$(scripts/release-root.sh versions "$suite")"
    status=0; scripts/release-root.sh test "$suite" -q --junitxml="$junit" >&2 || status=$?
    minutes=$(( ($(date +%s) - started + 30) / 60 ))
    result="$(python3 - "$junit" "$status" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    suite = ET.parse(sys.argv[1]).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    print(f"{'pass' if failed == 0 and sys.argv[2] == '0' else 'FAIL'}: {total - failed - skipped} passed, "
          f"{failed} failed, {skipped} skipped")
except (OSError, ET.ParseError, AttributeError, TypeError):
    print(f"FAIL: no test report (exit {sys.argv[2]})")
EOF
)"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
    rows+=("| $suite | $(field slurm) | $(field haproxy) | $(field python) | $result | $minutes |")
done

{
    printf 'Version matrix, %s (scripts/matrix.sh, commit %s)\n\n' "$(date -u +%Y-%m-%d)" "$(git rev-parse --short HEAD)"
    printf '| Debian suite | Slurm | HAProxy | Python | Result | Minutes |\n|---|---|---|---|---|---|\n'
    printf '%s\n' "${rows[@]}"
} | tee test-artifacts/matrix.md
exit "$failed"
