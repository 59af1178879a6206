#!/usr/bin/env bash
# Set up (first time only) and start the chat service on its embedded defaults:
# SQLite in ./data, the built-in demo model (built on first start), port 7860.
# Any `feedback-chat serve` flag may follow, e.g. --model Qwen/Qwen2.5-0.5B-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
exec .venv/bin/feedback-chat serve "$@"
