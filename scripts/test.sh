#!/usr/bin/env bash
# The one command that runs hpcserve's tests, on a fresh Debian machine too: installs what is
# missing (scripts/setup.sh), type-checks the package (mypy; --strict on the pure core), starts the
# local Slurm cluster, then runs pytest with every real part required (HPCSERVE_REQUIRE_REAL=1: a
# missing part fails its tests instead of skipping them).
# Arguments go to pytest, e.g. scripts/test.sh tests/unit -q
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
.venv/bin/mypy --no-error-summary
.venv/bin/mypy --no-error-summary --strict hpcserve/core
scripts/local-slurm.sh start
eval "$(scripts/local-slurm.sh env)"
export HPCSERVE_REQUIRE_REAL=1
exec .venv/bin/pytest "$@"
