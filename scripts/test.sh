#!/usr/bin/env bash
# Install everything the tests need, then run lint, format and type checks and the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k policy`).
source "$(dirname "$0")/_venv.sh"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# Services the integration tests start themselves (never a system service): Redis for the queue.
bash scripts/install-redis.sh
echo "== ruff"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit "$rc"
