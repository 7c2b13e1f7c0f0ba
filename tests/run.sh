#!/usr/bin/env bash
# The whole test suite: sets up .venv (once) and runs pytest. Extra arguments go to pytest.
# Needs Postgres on 127.0.0.1:5432 (trust auth) and Redis on 127.0.0.1:6379; .ci/run starts them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# docker-compose (Debian's) for tests/unit/test_compose.py, which runs `docker-compose config`:
# installed only when missing and we are root; without it the test fails under CI=true.
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null; } \
    || echo "warning: could not install docker-compose (tests/unit/test_compose.py needs it)" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
