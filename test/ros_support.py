"""Support for the ROS tests: a loopback-only DDS environment, subprocess helpers and an rclpy harness.

The environment (localhost discovery, the Fast DDS profile in test/fastdds_loopback.xml bound to 127.0.0.1, a ROS
domain of this test session's own, a private log folder) must be in place before rclpy is imported. conftest.py sets
it; :func:`ensure_ros_env` sets the same values when this module is used without it, and never overrides a value
that is already there. Subprocesses run with the same interpreter and without ``_ROS_WHEELS_BOOTSTRAP_COMPLETE``,
so the ROS wheels' bootstrapper sets up their library path itself.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TEST_DIR = Path(__file__).resolve().parent
REPO = TEST_DIR.parent
PROFILE = TEST_DIR / "fastdds_loopback.xml"
#: the same without shared memory, for children of a test that SIGKILLs a DDS process (see the file)
UDP_PROFILE = TEST_DIR / "fastdds_loopback_udp.xml"


def ensure_ros_env() -> None:
    """Loopback-only DDS settings for this process and its children (idempotent; conftest.py does the same)."""
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(PROFILE))
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
    os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="icnet_ros_test_roslog_"))
    os.environ.pop("ROS_LOCALHOST_ONLY", None)


ensure_ros_env()


def remove_orphaned_fastdds_segments(since: float, shm: str | Path = "/dev/shm", min_age: float = 5.0
                                     ) -> list[str]:
    """Delete Fast DDS shared-memory segments (``fastdds_<16 hex>`` and its ``_el`` lock file) created at or after
    ``since`` (a time.time()) that no live process maps and that are at least ``min_age`` seconds old. Processes the
    tests kill leave theirs behind (32 MiB loopback segments: hundreds of MB after a few runs). Port files and
    semaphores are Fast DDS's own business and stay. Returns the names removed."""
    import re

    shm = Path(shm)
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(m.group(1) for m in re.finditer(r"(\S*/fastdds_[0-9a-f]{16})(?:_el)?\b", text))
    removed = []
    now = time.time()
    for seg in shm.glob("fastdds_*"):
        m = re.fullmatch(r"(fastdds_[0-9a-f]{16})(_el)?", seg.name)
        if m is None:
            continue
        try:
            st = seg.stat()
        except OSError:
            continue
        if st.st_ctime < since or now - st.st_ctime < min_age or str(shm / m.group(1)) in mapped:
            continue
        try:
            seg.unlink()
            removed.append(seg.name)
        except OSError:
            pass
    return removed


def require_rclpy() -> Any:
    """Skip the module when rclpy (ROS 2 wheels or a ROS install) is not available."""
    return pytest.importorskip("rclpy", reason="rclpy not installed (pip install -e .[ros])")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that imports rclpy (bootstrap flag cleared, unbuffered output)."""
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Process:
    """A child Python process (``python -m module args``) whose output goes to a file (no pipe to fill up)."""

    def __init__(self, module: str, args: list[str], log_dir: Path, name: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name or module.rsplit(".", 1)[-1]
        self.log_path = Path(log_dir) / f"{self.name}.log"
        self._log = open(self.log_path, "w+b")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env or subprocess_env(), cwd=str(REPO))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float) -> None:
        """Wait until ``text`` appears in the output; fail with the output if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode} before printing {text!r}:\n"
                            f"{self.output()}")
            time.sleep(0.1)
        pytest.fail(f"{self.name} did not print {text!r} within {timeout} s:\n{self.output()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not exit within {timeout} s:\n{self.output()}")

    def interrupt(self, timeout: float = 20.0) -> int:
        """SIGINT (Ctrl-C) and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def run_module(module: str, args: list[str], timeout: float, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` to completion (output captured)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env(), cwd=str(REPO))


class Collector:
    """Messages received on one topic (thread-safe list + condition)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._cond = threading.Condition()

    def __call__(self, msg: Any) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def find(self, predicate: Callable[[Any], bool]) -> list[Any]:
        with self._cond:
            return [m for m in self.messages if predicate(m)]

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()


class RosHarness:
    """One test node in a private rclpy context, spun by a background executor."""

    def __init__(self, name: str = "icnet_test_harness") -> None:
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True, name="icnet_test_executor")
        self._thread.start()

    def _spin(self) -> None:
        from icnet_ros.ros_spin import spin

        spin(self.executor)  # tests destroy their publishers and subscriptions while it spins

    @staticmethod
    def qos(reliable: bool = True, depth: int = 10, transient_local: bool = False) -> Any:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable else
                          ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.TRANSIENT_LOCAL if
                          transient_local else DurabilityPolicy.VOLATILE)

    def publisher(self, msg_type: Any, topic: str, qos: Any = None) -> Any:
        return self.node.create_publisher(msg_type, topic, qos or self.qos())

    def collect(self, msg_type: Any, topic: str, qos: Any = None) -> Collector:
        col = Collector()
        col.subscription = self.node.create_subscription(msg_type, topic, col, qos or self.qos())
        return col

    def unsubscribe(self, col: Collector) -> None:
        self.node.destroy_subscription(col.subscription)

    def now(self) -> Any:
        return self.node.get_clock().now()

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        pytest.fail(f"timed out after {timeout} s waiting for {what}")

    def wait_matched(self, pub_or_sub: Any, count: int = 1, timeout: float = 30.0) -> None:
        getter = getattr(pub_or_sub, "get_subscription_count", None) or pub_or_sub.get_publisher_count
        self.wait_until(lambda: getter() >= count, timeout, f"{count} match(es) on {pub_or_sub.topic_name}")

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)
        self._thread.join(5.0)


@pytest.fixture(scope="module")
def ros() -> Iterator[RosHarness]:
    require_rclpy()
    harness = RosHarness()
    try:
        yield harness
    finally:
        harness.close()


def image_msg(img: np.ndarray, encoding: str, stamp: Any = None, frame_id: str = "camera") -> Any:
    """A sensor_msgs/Image of ``img`` with the given stamp (a builtin_interfaces/Time or an rclpy Time)."""
    from sensor_msgs.msg import Image

    from icnet_ros.ros_image import numpy_to_image

    msg = numpy_to_image(img, encoding, Image())
    msg.header.frame_id = frame_id
    if stamp is not None:
        msg.header.stamp = stamp.to_msg() if hasattr(stamp, "to_msg") else stamp
    return msg


def diagnostics_values(msgs: list[Any], status_name_suffix: str) -> dict[str, str] | None:
    """The key/values of the newest /diagnostics status whose name ends with ``status_name_suffix``."""
    for arr in reversed(msgs):
        for st in arr.status:
            if st.name.endswith(status_name_suffix):
                return {kv.key: kv.value for kv in st.values}
    return None
