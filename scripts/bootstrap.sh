#!/usr/bin/env bash
# Create ./.venv and install everything icnet_ros needs: PyTorch, the ROS 2 wheels (rclpy + Fast DDS from PyPI),
# and icnet_ros itself (editable) with the extras named in $1 (comma-separated, e.g. "ros,test").
# With the test extra it also installs the ROS 2 launch stack from ../shared/ros2-launch (launch, launch_ros,
# launch_testing, ros2cli; CPython 3.11 only) for the real `ros2 launch` tests, and colcon.
# Idempotent: nothing is installed when setup.py and TORCH_SPEC are unchanged and the extras asked for are already
# installed (run.sh's "ros" after test.sh's "ros,test,train" installs nothing, nor the other way round twice).
#   PYTHON      interpreter for a new .venv (default python3; 3.10-3.12, the ROS 2 wheels exist for those); an
#               existing complete .venv is kept whatever PYTHON says
#   TORCH_SPEC  PyTorch requirement and pip options (default torch==2.13.0; the CPU build from PyTorch's index:
#               TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu')
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras=${1:-ros}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LAUNCH_STACK=../shared/ros2-launch

version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
supported() { case "$1" in 3.10|3.11|3.12) return 0 ;; *) return 1 ;; esac; }
# A usable .venv: complete (a first run stopped early leaves bin/python without activate or pip) and made for this
# folder (a moved or renamed checkout's activate puts the old, missing bin/ on PATH: pip would then be whatever
# python comes next on PATH). Anything else is made again.
venv_ok() {
  [ -x .venv/bin/python ] && [ -f .venv/bin/activate ] && .venv/bin/python -m pip --version >/dev/null 2>&1 \
    && (. .venv/bin/activate >/dev/null 2>&1 && [ "$VIRTUAL_ENV" -ef .venv ])
}

if venv_ok; then  # the venv's interpreter is the one that counts (PYTHON only chooses it when the venv is made)
  ver=$(version_of .venv/bin/python)
  if ! supported "$ver"; then
    echo "icnet_ros needs Python 3.10-3.12 (ROS 2 wheels); .venv has $ver. Remove .venv and set PYTHON=python3.12 or similar." >&2
    exit 2
  fi
else
  ver=$(version_of "$PY")
  if ! supported "$ver"; then
    echo "icnet_ros needs Python 3.10-3.12 (ROS 2 wheels); $PY is $ver. Set PYTHON=python3.12 or similar." >&2
    exit 2
  fi
  if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "installing python3-venv (Debian/Ubuntu) ..." >&2
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq "python${ver}-venv" || $sudo_cmd apt-get install -y -qq python3-venv
  fi
  if [ -e .venv ]; then
    echo "making .venv again (it is incomplete, or was made for another folder) ..." >&2
  fi
  "$PY" -m venv --clear .venv
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
read -r -a torch_args <<<"$TORCH_SPEC"  # a requirement and perhaps pip options (--index-url ...)
venv_python="$PWD/.venv/bin/python"  # never whatever python is first on PATH
"$venv_python" -m pip install -q --upgrade pip "setuptools>=77.0.3,<80" wheel
"$venv_python" -m pip install -q "${torch_args[@]}"
"$venv_python" -m pip install -q -e ".[${pip_extras}]"
if grep -qx 'ros2-launch' <<<"$all"; then
  bash "$LAUNCH_STACK/install.sh" "$PWD/.venv/bin/python" >&2
elif grep -qx 'test' <<<"$all"; then
  echo "note: $LAUNCH_STACK (CPython 3.11 only) not installed: the real 'ros2 launch' tests will be skipped" >&2
fi
rm -f .venv/.icnet_ros-*
printf '%s\n' "$all" >"$stamp"
