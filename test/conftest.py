"""Test session set-up. DDS traffic must stay on this machine: before any test can import rclpy, force
localhost-only discovery, a Fast DDS profile bound to 127.0.0.1, a ROS domain of this session's own (1-100; one
per pytest-xdist worker) and a private log folder. Tests that start processes pass this environment on."""
import os
import random
import sys
import tempfile
import time
from pathlib import Path

TEST_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TEST_DIR))  # `import helpers`, `import ros_support`

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(TEST_DIR / "fastdds_loopback.xml")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # pytest-xdist's gw0, gw1, ...: each on a ROS domain of its own,
if _WORKER[:2] == "gw" and _WORKER[2:].isdigit():  # so that two test files' nodes and topics never meet
    os.environ["ROS_DOMAIN_ID"] = str((int(os.environ["ROS_DOMAIN_ID"]) - 1 + int(_WORKER[2:])) % 100 + 1)
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="icnet_ros_test_roslog_"))
os.environ.pop("ROS_LOCALHOST_ONLY", None)  # deprecated; RANGE=LOCALHOST replaces it

# One intra-op thread for this process and the processes tests start (nodes, torchrun workers): the suite runs
# several torch processes at once on 2 cores, where OpenMP threads spin-waiting on each other cost up to 20x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def colcon_ws(tmp_path_factory: pytest.TempPathFactory):
    """The package built with colcon in a temporary workspace, once per test session (test/launch_support.py);
    skips when the ROS 2 launch stack is not installed."""
    import launch_support

    reason = launch_support.launch_stack_missing()
    if reason:
        pytest.skip(reason)
    ws = launch_support.build_workspace(tmp_path_factory.mktemp("colcon_ws"))
    print(f"\ncolcon build of icnet_ros: {ws.build_seconds:.1f} s")
    return ws


_SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    """Remove the Fast DDS shared-memory segments that this session's killed processes left in /dev/shm."""
    import ros_support

    removed = ros_support.remove_orphaned_fastdds_segments(_SESSION_START)
    if removed:
        print(f"\nremoved {len(removed)} orphaned Fast DDS shared-memory files from /dev/shm")
