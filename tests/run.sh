#!/usr/bin/env bash
# The whole test suite: sets up .venv (once) and runs pytest. Extra arguments go to pytest.
# Needs Postgres on 127.0.0.1:5432 (trust auth) and Redis on 127.0.0.1:6379; .ci/run starts them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# The dashboard's browser test (tests/e2e/test_dashboard_browser.py) drives Debian's Chromium.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; } \
      || echo "tests/run.sh: could not install chromium and chromium-driver (the dashboard's browser test needs them)" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
