#!/usr/bin/env bash
# The whole test suite: sets up .venv (once) and runs pytest. Extra arguments go to pytest.
# Needs Postgres on 127.0.0.1:5432 (trust auth) and Redis on 127.0.0.1:6379; .ci/run starts them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# Debian packages some tests drive, installed only when missing and we are root (without them
# those tests fail under CI=true): docker-compose for tests/unit/test_compose.py (`docker-compose
# config`), chromium and its chromedriver for tests/e2e/test_dashboard_browser.py.
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }; } \
    || echo "tests/run.sh: could not install ${missing[*]} (tests/unit/test_compose.py and the dashboard's browser test need them)" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
