#!/usr/bin/env bash
# Create ./.venv and install everything icnet_ros needs: PyTorch, the ROS 2 wheels (rclpy + Fast DDS from PyPI),
# and icnet_ros itself (editable) with the extras named in $1 (comma-separated, e.g. "ros,test").
# With the test extra it also installs the ROS 2 launch stack from ../shared/ros2-launch (launch, launch_ros,
# launch_testing, ros2cli; CPython 3.11 only) for the real `ros2 launch` tests, and colcon.
# Idempotent: nothing is installed when setup.py and TORCH_SPEC are unchanged and the extras asked for are already
# installed (run.sh's "ros" after test.sh's "ros,test,train" installs nothing, nor the other way round twice).
#   PYTHON      interpreter to use (default python3; 3.10-3.12, the ROS 2 wheels exist for those)
#   TORCH_SPEC  PyTorch requirement (default torch==2.13.0; e.g. a CUDA build's index options on a GPU machine)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras=${1:-ros}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LAUNCH_STACK=../shared/ros2-launch

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
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE  # the ROS wheels' .pth must set up their library path in this venv

# The stamp names what was installed for this setup.py and torch spec; its content lists the extras installed.
key="$(sha256sum setup.py | cut -c1-16)-${TORCH_SPEC//[^a-zA-Z0-9.]/_}"
stamp=".venv/.icnet_ros-$key"
want=$(tr ',' '\n' <<<"$extras" | sed '/^$/d' | sort -u)
if [ -n "$want" ] && grep -qx 'test' <<<"$want" && [ -f "$LAUNCH_STACK/install.sh" ] && [ "$ver" = 3.11 ]; then
  want=$(printf '%s\nros2-launch\n' "$want" | sort -u)  # a pseudo-extra: the launch stack wheels
fi
have=""
[ -f "$stamp" ] && have=$(sort -u "$stamp")
missing=$(comm -23 <(printf '%s\n' "$want") <(printf '%s\n' "$have") | sed '/^$/d')
if [ -f "$stamp" ] && [ -z "$missing" ]; then
  exit 0  # everything asked for is there (perhaps with more extras)
fi
all=$(printf '%s\n%s\n' "$want" "$have" | sed '/^$/d' | sort -u)
pip_extras=$(grep -vx 'ros2-launch' <<<"$all" | paste -sd, -)
echo "setting up .venv (extras: $pip_extras) ..." >&2
python -m pip install -q --upgrade pip "setuptools>=77.0.3,<80" wheel
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[${pip_extras}]"
if grep -qx 'ros2-launch' <<<"$all"; then
  bash "$LAUNCH_STACK/install.sh" "$PWD/.venv/bin/python" >&2
elif grep -qx 'test' <<<"$all"; then
  echo "note: $LAUNCH_STACK (CPython 3.11 only) not installed: the real 'ros2 launch' tests will be skipped" >&2
fi
rm -f .venv/.icnet_ros-*
printf '%s\n' "$all" >"$stamp"
