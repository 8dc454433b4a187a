#!/usr/bin/env bash
# Tests: set up (first run only, with the test extra: mmsegmentation for parity, the ROS 2 launch stack from
# ../shared/ros2-launch and colcon for the real `ros2 launch` tests), then run the whole suite on CPU.
# DDS stays on loopback (see test/conftest.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh ros,test,train
# shellcheck disable=SC1091
. .venv/bin/activate
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE  # never inherit it: the ROS wheels must set up their library path here
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"  # the venv is an ament prefix
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export FASTDDS_DEFAULT_PROFILES_FILE="$PWD/test/fastdds_loopback.xml"
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$((RANDOM % 100 + 1))}
# Two worker processes, each taking whole test files (module fixtures are built once): most tests wait on processes,
# DDS and timers, so the 2-core machine is about 1.4x faster than with one (ICNET_TEST_WORKERS=0: one process).
exec python -m pytest -q -ra -n "${ICNET_TEST_WORKERS:-2}" --dist loadfile "$@"
