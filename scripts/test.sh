#!/usr/bin/env bash
# Tests: set up (first run only, with the test extra: mmsegmentation for parity), then run the whole suite on CPU.
# DDS stays on loopback (see test/conftest.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh ros,test,train
# shellcheck disable=SC1091
. .venv/bin/activate
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export FASTDDS_DEFAULT_PROFILES_FILE="$PWD/test/fastdds_loopback.xml"
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$((RANDOM % 100 + 1))}
exec python -m pytest -q -ra "$@"
