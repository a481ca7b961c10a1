#!/usr/bin/env bash
# Installs what the comparison benchmarks (python -m benchmarks) need beyond scripts/setup.sh,
# idempotently: Debian's nginx-light (one of the systems compared) and LiteLLM's proxy in a virtual
# environment of its own, .venv-litellm (its pinned dependencies stay out of hpcserve's). With
# --guidellm also guidellm, the standard load generator of the cross-check (benchmarks/crosscheck.py),
# in .venv-guidellm: about 6 GB with the torch it requires, so only on request.
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

if [ "${1:-}" = "--guidellm" ] && [ ! -x .venv-guidellm/bin/guidellm ]; then
    log "installing guidellm (with torch, about 6 GB) into .venv-guidellm"
    python3 -m venv .venv-guidellm
    # gguf and sentencepiece: transformers converts the model's tokenizer from its GGUF file.
    .venv-guidellm/bin/pip install -q --disable-pip-version-check "guidellm==0.8.1" gguf sentencepiece
fi

log "ready: .venv/bin/python -m benchmarks run"
