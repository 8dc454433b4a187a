"""The real ROS 2 launch stack in tests: the package built with colcon in a temporary workspace, and ``ros2``
commands (launch, param, topic, lifecycle) run against it.

The launch stack comes from ../shared/ros2-launch (scripts/bootstrap.sh installs it with the test extra: launch,
launch_ros, launch_testing, ros2cli; PyPI lacks them). Without it the tests that need it skip. The build is shared by
the whole test session (conftest.py's ``colcon_ws`` fixture). Every process gets the loopback-only DDS environment of
this session (ros_support.subprocess_env).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import ros_support

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "icnet_ros"
# What colcon needs of the package (the rest of the repository is not part of it).
PACKAGE_FILES = ("setup.py", "setup.cfg", "package.xml", "LICENSE", "resource", "launch", "config", PACKAGE)
TRACEBACK = "Traceback (most recent call last)"


def launch_stack_missing() -> str | None:
    """Why the real launch tests cannot run here, or None."""
    for module in ("launch", "launch_ros", "ros2cli", "ros2launch", "colcon_core"):
        if importlib.util.find_spec(module) is None:
            return (f"{module} is not installed (bash scripts/test.sh installs ../shared/ros2-launch and colcon; "
                    f"CPython 3.11 only)")
    if not (Path(sys.executable).parent / "ros2").exists():
        return "the ros2 command is not installed next to this interpreter"
    return None


@dataclass
class Workspace:
    """A colcon workspace with the package built and installed; ``env`` is ``source install/setup.bash``'s."""

    root: Path
    env: dict[str, str]
    build_seconds: float

    @property
    def prefix(self) -> Path:
        return self.root / "install" / PACKAGE


def _copy_package(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    dest.mkdir(parents=True)
    for name in PACKAGE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def sourced_env(setup_bash: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment after ``source setup_bash`` in bash, starting from ``base``."""
    out = subprocess.run(["bash", "-c", f'source "{setup_bash}" >/dev/null && env -0'], env=base, check=True,
                         capture_output=True, timeout=60).stdout
    env = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    return env


def readme_colcon_command() -> list[str]:
    """The README's colcon command (``python -m colcon build ...``), with this interpreter as ``python``."""
    text = (REPO / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("python -m colcon build")]
    if len(lines) != 1:
        pytest.fail(f"README.md should give one 'python -m colcon build' command, found {lines}")
    return [sys.executable, *shlex.split(lines[0])[1:]]


def build_workspace(root: Path) -> Workspace:
    """The README's ``python -m colcon build`` (with this interpreter, so the executables' shebang is this venv's
    Python) in ``root`` with a copy of the package in ``src/``: the README's recipe, minus the clone."""
    _copy_package(root / "src" / PACKAGE)
    base = ros_support.subprocess_env()
    base["AMENT_PREFIX_PATH"] = os.pathsep.join(p for p in (sys.prefix, base.get("AMENT_PREFIX_PATH", "")) if p)
    base.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    t0 = time.perf_counter()
    proc = subprocess.run(readme_colcon_command(), cwd=root, env=base, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        pytest.fail(f"colcon build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return Workspace(root, sourced_env(root / "install" / "setup.bash", base), seconds)


class Launched:
    """A command (``ros2 launch ...``) running in its own process group, as a terminal runs a foreground job;
    output to a file. ``interrupt()`` sends SIGINT to the whole group, like Ctrl-C in that terminal."""

    def __init__(self, args: list[str], ws: Workspace, log_dir: Path, name: str = "launch") -> None:
        self.args = args
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "w+b")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=ws.env, cwd=ws.root,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the regular expression ``pattern`` matches the output; fail with the output otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                m = re.search(pattern, self.output())
                if m:
                    return m
                pytest.fail(f"{self.args} exited with {self.proc.returncode} before printing {pattern!r}:\n"
                            f"{self.output()}")
            time.sleep(0.1)
        pytest.fail(f"{self.args} did not print {pattern!r} within {timeout} s:\n{self.output()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.args} did not exit within {timeout} s:\n{self.output()}")

    def interrupt(self, timeout: float = 30.0) -> tuple[int, float]:
        """Ctrl-C: SIGINT to the process group. Returns (exit status, seconds until exit)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.wait(timeout), time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._log.close()


DAEMON_VERBS = {("param", "set"), ("param", "get"), ("lifecycle", "set"), ("lifecycle", "get"),
                ("topic", "list"), ("node", "list")}  # the verbs that would start (or use) the ros2 daemon


#: the verbs with ``--timeout N`` (wait up to N s in the same process for the node to be discovered; default 1 s)
NODE_TIMEOUT_VERBS = {("param", "set"), ("param", "get"), ("param", "load"), ("param", "dump")}


def ros2(ws: Workspace, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``ros2 ARGS`` to completion, output captured; never with the daemon (it would outlive the tests, and a
    daemon that has not seen the graph yet answers wrongly or hangs). ``ros2 param`` waits up to 10 s for the node
    (``--timeout``): with its default 1 s a call under load often missed the node and was repeated, each repeat a
    new process (~2 s)."""
    args = tuple(args)
    if tuple(args[:2]) in DAEMON_VERBS and "--no-daemon" not in args:
        args = (*args, "--no-daemon")
    if tuple(args[:2]) in NODE_TIMEOUT_VERBS and "--timeout" not in args:
        args = (*args, "--timeout", "10")
    return subprocess.run(["ros2", *args], env=ws.env, cwd=ws.root, capture_output=True, text=True, timeout=timeout)


#: what ``ros2`` prints when a call without the daemon missed a node that is up
NOT_FOUND = ("Node not found", "not available", "Waiting for")


def poll_ros2(ws: Workspace, args: list[str], expect: str, timeout: float = 60.0,
              retry_on: tuple[str, ...] | None = None) -> str:
    """Repeat ``ros2 ARGS`` until its output contains ``expect`` (graph queries can miss an entity that is up);
    with ``retry_on``, only while the output contains one of those (e.g. :data:`NOT_FOUND`): any other answer is
    final. Fails with the last output."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        try:
            proc = ros2(ws, *args, timeout=30.0)
        except subprocess.TimeoutExpired:  # a call can hang on discovery under load: ask again
            out = "timed out"
            continue
        out = proc.stdout + proc.stderr
        if expect in out:
            return out
        if retry_on is not None and not any(text in out for text in retry_on):
            break
        time.sleep(0.5)
    pytest.fail(f"`ros2 {' '.join(args)}`: expected {expect!r} (within {timeout} s); last output:\n{out}")
