#!/usr/bin/env bash
# Create .venv and install the project into it (idempotent: a stamp file per
# pyproject.toml content skips the work next time).
#   deploy/setup.sh          serving dependencies
#   deploy/setup.sh --dev    plus the test tools (pytest, playwright, trl, ...)
# torch is installed first on its own, as FEEDBACK_CHAT_TORCH (default torch==2.13.0)
# when none is importable, so the project's loose torch range keeps that build.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
venv=${FEEDBACK_CHAT_VENV:-.venv}
extras=serve
[ "${1:-}" = "--dev" ] && extras=dev

if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "feedback-chat needs Python 3.11 or newer; $py is $("$py" -V 2>&1)" >&2; exit 1
fi
stamp="$venv/.installed-$extras-$(sha256sum pyproject.toml | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "setting up $venv ($extras)..." >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  pip install "${FEEDBACK_CHAT_TORCH:-torch==2.13.0}"
fi
pip install -e ".[$extras]"
rm -f "$venv"/.installed-*
touch "$stamp"
echo "ready: $venv" >&2
