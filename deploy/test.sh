#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite on this machine:
# installs the dev dependencies, Debian's chromium (browser tests) and postgresql
# (store tests) when missing, starts a throwaway PostgreSQL on loopback, runs pytest.
# Extra arguments go to pytest, e.g. deploy/test.sh -k store -x
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh --dev

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
  else
    echo "warning: cannot install $* (not root or no apt-get)" >&2
  fi
}
[ -x /usr/bin/chromium ] || apt_install chromium

if [ -z "${FEEDBACK_CHAT_TEST_POSTGRES_URL:-}" ]; then
  pgdir=$(mktemp -d /tmp/feedback-chat-pg.XXXXXX)
  port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  FEEDBACK_CHAT_TEST_POSTGRES_URL=$(deploy/test-postgres.sh start "$pgdir" "$port")
  export FEEDBACK_CHAT_TEST_POSTGRES_URL
  trap 'deploy/test-postgres.sh stop "$pgdir" 2>/dev/null; rm -rf "$pgdir"' EXIT
fi
export FEEDBACK_CHAT_REQUIRE_POSTGRES=1
.venv/bin/python -m pytest "$@"
