#!/usr/bin/env bash
# Make sure `redis-server` is on PATH for the Redis Streams queue tests (tests/integration).
#
# Idempotent: does nothing when redis-server is already there. Otherwise installs Debian's
# `redis-server` package with apt-get (CI machines are fresh Debian and run as root). The
# package's own service is neither started nor enabled: the tests start a private, throw-away
# server on an ephemeral port themselves (tests/redis_server.py).
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-redis.sh: redis-server is not on PATH and apt-get is unavailable; install Redis >= 6.2 by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
# policy-rc.d exit code 101 tells invoke-rc.d not to start services during the install (containers
# usually have no init anyway; on a real host this keeps the install from launching a system Redis).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
command -v redis-server >/dev/null
redis-server --version
