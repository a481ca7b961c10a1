#!/usr/bin/env bash
# Runs hpcserve's tests against other Slurm and HAProxy releases: a Debian root per suite, built with
# debootstrap from Debian's registry and cached, in which a local Slurm cluster and HAProxy of that
# suite run (in namespaces of their own: mounts, PIDs and network, so the host's cluster and ports
# are untouched).
#
#   scripts/release-root.sh build SUITE            # debootstrap the root (trixie, sid, ...); cached
#   scripts/release-root.sh versions SUITE         # "slurm=24.11.5 haproxy=3.0.11 python=3.13.5"
#   (SUITE "host" in `versions` and `test`: this machine's own Slurm and HAProxy, by scripts/test.sh)
#   scripts/release-root.sh test SUITE [PYTEST...] # the suite's cluster + pytest (no test path: RELEASE_TESTS)
#   scripts/release-root.sh shell SUITE [COMMAND]  # a shell (or COMMAND) inside, the cluster started
#
# The checkout is bind-mounted at its own path, so the host's model (.cache/models) and llama-server
# (built for this CPU by scripts/setup.sh) serve inside as well; hpcserve and the test dependencies
# get a virtual environment of the suite's Python in the root (/opt/hpcserve-venv). Roots live in
# HPCSERVE_ROOTS (default /var/cache/hpcserve/roots); delete one to rebuild it. Needs root.
# Verified: trixie = Slurm 24.11.5, HAProxy 3.0.11; sid = Slurm 26.05.x, HAProxy 3.2.x (2026-11).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"
roots="${HPCSERVE_ROOTS:-/var/cache/hpcserve/roots}"
mirror="${HPCSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="slurm-wlm,munge,haproxy,python3,python3-venv,procps,curl,ca-certificates,libgomp1"
# libgomp1: the host's llama-server (built with OpenMP) runs inside.
venv=/opt/hpcserve-venv

# The tests that talk to Slurm or HAProxy, and two end-to-end ones with the real llama-server and
# model (a pool up, a chat, scale, down; and a job warned by Slurm's --signal leaving rotation).
# Left out: the pure unit tests, the simulator (its API and timing against the real llama-server),
# the load generator, the policy model and the llama-server replays: they touch neither Slurm nor
# HAProxy, and the llama-server and model are the host's in every root, so a root can find nothing
# there that the host run cannot.
RELEASE_TESTS=(tests/integration
               "tests/e2e/test_pool.py::test_up_chat_scale_down"
               "tests/e2e/test_lifecycle.py::test_a_warned_job_leaves_rotation_before_it_ends"
               --ignore=tests/integration/test_simulator.py
               --ignore=tests/integration/test_simulator_timing.py
               --ignore=tests/integration/test_load_generator.py
               --ignore=tests/integration/test_policy_model.py
               --ignore=tests/integration/test_llama_builds.py)

log() { printf 'release-root: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "this needs root (debootstrap, chroot, namespaces); run it with sudo"
    exit 1
fi

build() {  # build SUITE: the root with the suite's packages, and the venv; both only once
    local suite="$1" root="$roots/$1"
    if [ ! -x "$root/usr/sbin/slurmctld" ]; then
        command -v debootstrap >/dev/null || {
            log "installing debootstrap"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        }
        log "debootstrap $suite into $root (about a minute)"
        rm -rf "$root.partial"
        mkdir -p "$roots"
        debootstrap --variant=minbase --include="$packages" "$suite" "$root.partial" "$mirror" \
            >"$roots/$suite.debootstrap.log" 2>&1 || { log "debootstrap failed; see $roots/$suite.debootstrap.log"; exit 1; }
        mv "$root.partial" "$root"
    fi
    cp /etc/resolv.conf /etc/hosts "$root/etc/"
    # The host's CA bundle: a site (or CI) proxy that re-signs TLS is trusted inside as well.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
    # Slurm's accounting (slurmdbd on MariaDB, as scripts/local-slurm.sh runs it), into roots built
    # before it too. No service starts in the root while the packages install (policy-rc.d says no).
    if [ ! -x "$root/usr/sbin/slurmdbd" ] || [ ! -x "$root/usr/sbin/mariadbd" ]; then
        log "installing slurmdbd and mariadb-server into $suite"
        printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
        chmod 755 "$root/usr/sbin/policy-rc.d"
        # Check-Valid-Until off: a mirror's snapshot of a suite (sid's Release is valid for a week)
        # stays installable after its date, as the root built from it does.
        inside "$suite" network "apt-get -o Acquire::Check-Valid-Until=false update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurmdbd mariadb-server >/dev/null" \
            || { log "installing slurmdbd and mariadb-server into $suite failed"; exit 1; }
    fi
    # The venv follows pyproject.toml and this list: rebuilt when either changes.
    local requirements="-e '$repo[bench]' pytest hypothesis openai"
    local stamp; stamp="$({ cat pyproject.toml; echo "$requirements"; } | sha256sum | cut -c1-16)"
    if [ "$(cat "$root$venv/.hpcserve-stamp" 2>/dev/null)" != "$stamp" ]; then
        log "installing hpcserve and the test dependencies into $suite:$venv"
        inside "$suite" network "python3 -m venv --clear $venv && $venv/bin/pip install -q --disable-pip-version-check \
            $requirements && echo $stamp > $venv/.hpcserve-stamp"
    fi
    # The host's llama-server (the wheel's or the one scripts/setup.sh built for this CPU).
    local server; server="$(readlink -f .venv/bin/llama-server 2>/dev/null || true)"
    [ -x "$server" ] && ln -sf "$server" "$root$venv/bin/llama-server"
    return 0
}

# inside SUITE network|isolated COMMAND: COMMAND by bash in the root, in a mount and PID namespace of
# its own (its /proc, /dev, the checkout at its path); `isolated` adds a network namespace with
# only a loopback, so the suite's slurmctld, slurmd and HAProxy ports never meet the host's. The
# suite's cluster lives in /tmp/hpcserve-slurm-SUITE: the host sees its daemons' command lines, and
# the host's scripts/local-slurm.sh (which finds its daemons by theirs) must not take them for its own.
inside() {
    local suite="$1" mode="$2" command="$3" root="$roots/$1"
    local net=(); [ "$mode" = isolated ] && net=(--net)
    mkdir -p "$root$repo"
    unshare --mount --pid --fork "${net[@]}" --propagation private bash -euc '
        root="$1" repo="$2" mode="$3" command="$4"
        mount --bind "$root" "$root"    # the root a mount point: unshare --propagation works inside
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount -t tmpfs -o size=50% tmpfs "$root/dev/shm"
        mount -t tmpfs tmpfs "$root/run"
        mount --bind "$repo" "$root$repo"
        if [ "$mode" = isolated ]; then
            # One address besides 127.0.0.1: glibc answers getaddrinfo(AI_ADDRCONFIG), which
            # slurmctld 24.11 listens with, only where a non-loopback IPv4 address exists.
            ip link set lo up
            ip addr add 10.213.0.1/32 dev lo
        fi
        exec chroot "$root" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 \
            HPCSERVE_SLURM_DIR="/tmp/hpcserve-slurm-$(basename "$root")" \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin CI="${CI:-}" \
            bash -euc "cd $repo; $command"' _ "$root" "$repo" "$mode" "$command"
}

# The releases a Python, slurmctld and haproxy run, on one line.
versions_line='printf "slurm=%s haproxy=%s python=%s\n" "$(slurmctld -V | cut -d" " -f2)" \
    "$(haproxy -v | sed -n "s/^HAProxy version \([^ -]*\).*/\1/p")" "$($0 -c "import platform; print(platform.python_version())")"'

versions() {  # versions SUITE: the releases the suite runs
    inside "$1" isolated "bash -c '$versions_line' $venv/bin/python"
}

versions_here() { bash -c "$versions_line" .venv/bin/python; }

# release_args [PYTEST ARGS]: sets `args`: the arguments, plus RELEASE_TESTS when none names a test path.
release_args() {
    args=("$@")
    local arg
    for arg in "$@"; do [[ "$arg" == tests* ]] && return; done
    args+=("${RELEASE_TESTS[@]}")
}

run_tests_here() {  # run_tests_here [PYTEST ARGS]: the same tests on this host (scripts/test.sh)
    release_args "$@"
    scripts/test.sh -p no:cacheprovider "${args[@]}"
}

run_tests() {  # run_tests SUITE [PYTEST ARGS]: start the suite's cluster, then pytest
    local suite="$1"; shift
    release_args "$@"
    rm -rf "${roots:?}/$suite/tmp/"*
    inside "$suite" isolated "scripts/local-slurm.sh start && eval \"\$(scripts/local-slurm.sh env)\" \
        && HPCSERVE_REQUIRE_REAL=1 $venv/bin/pytest -p no:cacheprovider $(printf '%q ' "${args[@]}")"
}

case "${1:-}" in
    build) build "${2:?suite}" ;;
    versions) if [ "${2:?suite}" = host ]; then versions_here; else build "$2"; versions "$2"; fi ;;
    test) suite="${2:?suite}"; shift 2
          if [ "$suite" = host ]; then run_tests_here "$@"; else build "$suite"; run_tests "$suite" "$@"; fi ;;
    shell) suite="${2:?suite}"; shift 2; build "$suite"
           command="exec bash -i"; [ "$#" -gt 0 ] && command="$(printf '%q ' "$@")"
           inside "$suite" isolated "scripts/local-slurm.sh start >&2; eval \"\$(scripts/local-slurm.sh env)\"; $command" ;;
    *) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2 ;;   # the header above
esac
