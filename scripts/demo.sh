#!/usr/bin/env bash
# Install enclaveml into .venv and run `enclaveml demo` on its embedded defaults.
source "$(dirname "$0")/_venv.sh"
.venv/bin/pip install -q --disable-pip-version-check .
exec .venv/bin/enclaveml demo "$@"
