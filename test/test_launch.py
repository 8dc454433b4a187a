"""launch/icnet.launch.py through the real ROS 2 launch stack: the package built with colcon in a temporary
workspace (once per test session), started with `ros2 launch` as the README does, and inspected and driven with
`ros2 topic` and `ros2 param` while frames flow over DDS (loopback only).

The launch stack (launch, launch_ros, ros2cli) is not on PyPI: scripts/test.sh installs it from ../shared/ros2-launch;
without it these tests skip with the reason."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ros_support
from helpers import make_checkpoint
from launch_support import TRACEBACK, Launched, Workspace, poll_ros2, ros2
from ros_support import RosHarness, image_msg, ros  # noqa: F401 - fixture

ros_support.require_rclpy()

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from icnet_ros.node import auto_cpu_threads  # noqa: E402
from icnet_ros.ros_image import numpy_to_compressed  # noqa: E402

pytestmark = pytest.mark.ros
LAUNCH = ["ros2", "launch", "icnet_ros", "icnet.launch.py"]
READY = r"\[icnet_node.*\]: ready: "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("icnet_launch") / "tiny.safetensors")


def test_colcon_install_runs_with_the_building_python(colcon_ws: Workspace):
    """`python -m colcon build` from a venv (the README's recipe) installs executables whose shebang is that venv's
    Python, so `ros2 run` and `ros2 launch` find torch there; the launch file, config and model land in share/."""
    import sys

    exe = colcon_ws.prefix / "lib" / "icnet_ros" / "icnet_node"
    assert exe.is_file() and exe.stat().st_mode & 0o111
    assert exe.read_text().splitlines()[0] == f"#!{sys.executable}"
    share = colcon_ws.prefix / "share" / "icnet_ros"
    for rel in ("launch/icnet.launch.py", "config/icnet.yaml", "config/icnet.rviz", "package.xml"):
        assert (share / rel).is_file(), rel
    assert list((share / "models").glob("*.safetensors"))
    assert (colcon_ws.prefix / "share" / "ament_index" / "resource_index" / "packages" / "icnet_ros").is_file()
    out = ros2(colcon_ws, "pkg", "executables", "icnet_ros")
    assert "icnet_ros icnet_node" in out.stdout, out.stdout + out.stderr


def _frame(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = rng.integers(0, 256, 3)
    img[h // 2:] = rng.integers(0, 256, 3)
    return img


def _serve(ros: RosHarness, pub: Any, label: Any, make_msg: Any, attempts: int = 6) -> Any:
    """Publish fresh frames until a label comes back (best-effort input; discovery can lose the first)."""
    for _ in range(attempts):
        pub.publish(make_msg(ros.now().to_msg()))
        if label.wait_for(lambda m: len(m) >= 1, 5):
            return label.messages[0]
    pytest.fail("no label came back")


@pytest.mark.slow
def test_readme_launch_with_namespace_cameras_and_rviz(colcon_ws: Workspace, ros: RosHarness, checkpoint: Path,
                                                      tmp_path: Path):
    """`ros2 launch icnet_ros icnet.launch.py` with a namespace, a raw camera given relative (it resolves inside the
    namespace), a compressed camera and rviz:=true on a machine without rviz2: the launch says so and the node still
    serves both cameras; its topics are listed by `ros2 topic list`; a live parameter changes with `ros2 param set`;
    Ctrl-C ends the launch with status 0."""
    launched = Launched([*LAUNCH, "namespace:=robot1", "image_topics:=[front/image_raw, /rear/image_raw/compressed]",
                         f"model:={checkpoint}", "device:=cpu", "rviz:=true"], colcon_ws, tmp_path)
    raw_pub = ros.publisher(Image, "/robot1/front/image_raw")
    jpeg_pub = ros.publisher(CompressedImage, "/rear/image_raw/compressed")
    front = ros.collect(Image, "/robot1/front/semantic/label")
    rear = ros.collect(Image, "/rear/semantic/label")
    try:
        launched.wait_for_output("rviz2 is not installed", 60)
        ready = launched.wait_for_output(READY + r"model (\S+) on cpu.*", 120).group(0)
        assert str(checkpoint) in ready and "front/image_raw -> front/semantic/*" in ready
        threads = auto_cpu_threads()  # num_threads 0 on the CPU: all cores but one
        assert f"(fp32, {threads} CPU thread{'s' if threads != 1 else ''})" in ready
        assert "/rear/image_raw/compressed (compressed) -> /rear/semantic/*" in ready
        for entity in (front.subscription, rear.subscription, raw_pub, jpeg_pub):
            ros.wait_matched(entity)

        img = _frame()
        got = _serve(ros, raw_pub, front, lambda stamp: image_msg(img, "rgb8", stamp, frame_id="front"))
        assert (got.height, got.width, got.encoding, got.header.frame_id) == (96, 128, "mono8", "front")

        def jpeg(stamp: Any) -> Any:
            fmt, data = numpy_to_compressed(img, "RGB", "jpeg")
            msg = CompressedImage(format=fmt, data=data)
            msg.header.stamp, msg.header.frame_id = stamp, "rear"
            return msg

        got = _serve(ros, jpeg_pub, rear, jpeg)
        assert (got.height, got.width, got.header.frame_id) == (96, 128, "rear")

        topics = poll_ros2(colcon_ws, ["topic", "list", "--no-daemon"], "/robot1/icnet_node/classes")
        for topic in ("/robot1/front/semantic/overlay", "/robot1/front/semantic/camera_info",
                      "/rear/semantic/color", "/rear/semantic/confidence", "/diagnostics"):
            assert topic in topics.split(), topics

        out = ros2(colcon_ws, "param", "set", "/robot1/icnet_node", "max_batch", "2")
        assert "Set parameter successful" in out.stdout, out.stdout + out.stderr
        out = ros2(colcon_ws, "param", "get", "/robot1/icnet_node", "max_batch")
        assert re.search(r"Integer value is: 2\b", out.stdout), out.stdout + out.stderr
        out = ros2(colcon_ws, "param", "set", "/robot1/icnet_node", "max_batch", "0")  # validated like at start-up
        assert "Setting parameter failed: parameter 'max_batch' = 0: must be in [1, 64]" in out.stderr, out

        status, _seconds = launched.interrupt(30)
        assert status == 0, launched.output()
        assert "Caught exception in launch" not in launched.output()
    finally:
        launched.kill()
        for col in (front, rear):
            ros.unsubscribe(col)
        ros.node.destroy_publisher(raw_pub)
        ros.node.destroy_publisher(jpeg_pub)


@pytest.mark.parametrize("argument,message", [
    ("image_topics:=[]", "parameter 'image_topics' = []: must list at least one image topic"),
    ("image_topics:=[/a/image_raw, ", "parameter 'image_topics': expected string_array, got string '[/a/image_raw,'"),
    ("image_topics:=[/a/image raw]",
     "parameter 'image_topics' = ['/a/image raw']: '/a/image raw' is not a valid ROS topic name"),
    ("device:=gpu", "parameter 'device' = 'gpu': must be auto, cpu, cuda or cuda:N"),
])
def test_bad_arguments_get_the_nodes_own_error(colcon_ws: Workspace, tmp_path: Path, argument: str, message: str):
    """An empty or malformed image_topics (or another bad override) ends the launch with the node's own one-line
    error and a failure status before anything starts (launch_ros itself fails on an empty list in a parameter dict
    with an unrelated type error)."""
    launched = Launched([*LAUNCH, argument], colcon_ws, tmp_path)
    try:
        status = launched.wait(60)
        out = launched.output()
        errors = [line for line in out.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and errors[0].endswith(f"icnet_node: error: {message}"), out
        assert status != 0 and "process started" not in out and TRACEBACK not in out, out
    finally:
        launched.kill()
