#!/usr/bin/env bash
# Set up, then run the whole test suite (slow tests included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The code-grading sandbox uses bubblewrap where present (falls back to unshare + rlimits).
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 || echo "bubblewrap not installed; sandbox falls back to unshare"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
