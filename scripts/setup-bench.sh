#!/usr/bin/env bash
# Installs what the comparison benchmarks (python -m benchmarks) need beyond scripts/setup.sh,
# idempotently: Debian's nginx-light (one of the systems compared) and LiteLLM's proxy in a virtual
# environment of its own, .venv-litellm (its pinned dependencies stay out of hpcserve's).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'setup-bench: %s\n' "$*" >&2; }

scripts/setup.sh >/dev/null
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    log "installing Debian package nginx-light"
    sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq nginx-light >/dev/null
fi
if [ ! -x .venv-litellm/bin/litellm ]; then
    log "installing litellm[proxy] into .venv-litellm"
    python3 -m venv .venv-litellm
    .venv-litellm/bin/pip install -q --disable-pip-version-check "litellm[proxy]==1.106.2"
fi

log "ready: .venv/bin/python -m benchmarks run"
