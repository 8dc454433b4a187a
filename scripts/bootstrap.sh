#!/usr/bin/env bash
# Create ./.venv and install everything icnet_ros needs: PyTorch, the ROS 2 wheels (rclpy + Fast DDS from PyPI),
# and icnet_ros itself (editable) with the extras named in $1 (comma-separated, e.g. "ros,test").
# Idempotent: re-running with unchanged setup.py and extras installs nothing.
#   PYTHON      interpreter to use (default python3; 3.10-3.12, the ROS 2 wheels exist for those)
#   TORCH_SPEC  PyTorch requirement (default torch==2.13.0; e.g. a CUDA build's index options on a GPU machine)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras=${1:-ros}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$ver" in
  3.10|3.11|3.12) ;;
  *) echo "icnet_ros needs Python 3.10-3.12 (ROS 2 wheels); $PY is $ver. Set PYTHON=python3.12 or similar." >&2; exit 2 ;;
esac

if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "installing python3-venv (Debian/Ubuntu) ..." >&2
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq "python${ver}-venv" || $sudo_cmd apt-get install -y -qq python3-venv
  fi
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.icnet_ros-$(cat setup.py | sha256sum | cut -c1-16)-${extras//,/_}-${TORCH_SPEC//[^a-zA-Z0-9.]/_}"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setting up .venv (extras: $extras) ..." >&2
python -m pip install -q --upgrade pip "setuptools>=77.0.3,<80" wheel
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[${extras}]"
rm -f .venv/.icnet_ros-*
touch "$stamp"
