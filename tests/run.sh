#!/usr/bin/env bash
# The whole test suite: sets up .venv (once) and runs pytest. Extra arguments go to pytest.
# Needs Postgres on 127.0.0.1:5432 (trust auth) and Redis on 127.0.0.1:6379; .ci/run starts them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
