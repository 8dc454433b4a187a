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
from launch_support import NOT_FOUND, TRACEBACK, Launched, Workspace, poll_ros2, ros2
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


@pytest.fixture(scope="module")
def checkpoint2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model with the same classes (other weights): a hot swap target."""
    return make_checkpoint(tmp_path_factory.mktemp("icnet_launch2") / "tiny_b.safetensors", seed=7)


def ros2_retry(ws: Workspace, *args: str, ok: str) -> str:
    """``ros2 ARGS`` until it answers ``ok``, retrying only while it has not found the node yet."""
    return poll_ros2(ws, list(args), ok, retry_on=NOT_FOUND)


def assert_clean_exit(launched: Launched, seconds: float) -> None:
    """The node exited with status 0 and nothing printed a traceback."""
    out = launched.output()
    assert TRACEBACK not in out and "KeyboardInterrupt" not in out, out
    assert re.search(r"\[icnet_node-\d+\]: process has finished cleanly", out), out
    assert seconds < 5.0, f"took {seconds:.1f} s to stop:\n{out}"


def test_colcon_install_runs_with_the_building_python(colcon_ws: Workspace):
    """`python -m colcon build` from a venv (the README's recipe) installs executables whose shebang is that venv's
    Python, so `ros2 run` and `ros2 launch` find torch there; the launch file and config land in share/, the model
    inside the package."""
    import sys

    exe = colcon_ws.prefix / "lib" / "icnet_ros" / "icnet_node"
    assert exe.is_file() and exe.stat().st_mode & 0o111
    assert exe.read_text().splitlines()[0] == f"#!{sys.executable}"
    share = colcon_ws.prefix / "share" / "icnet_ros"
    for rel in ("launch/icnet.launch.py", "config/icnet.yaml", "config/icnet.rviz", "package.xml"):
        assert (share / rel).is_file(), rel
    assert list(colcon_ws.prefix.glob("lib/python*/site-packages/icnet_ros/weights/*.safetensors"))
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
                                                      checkpoint2: Path, tmp_path: Path):
    """`ros2 launch icnet_ros icnet.launch.py` with a namespace, a raw camera given relative (it resolves inside the
    namespace), a compressed camera and rviz:=true on a machine without rviz2: the launch says so and the node still
    serves both cameras; its topics are in the graph; live parameters change with `ros2 param set`;
    the model switches by hot swap (bad models refused, the old one serving on); Ctrl-C (SIGINT to the process
    group: the node gets it twice) ends launch and node with status 0, no traceback, within 5 s."""
    launched = Launched([*LAUNCH, "namespace:=robot1", "image_topics:=[front/image_raw, /rear/image_raw/compressed]",
                         f"model:={checkpoint}", "device:=cpu", "rviz:=true"], colcon_ws, tmp_path)
    raw_pub = ros.publisher(Image, "/robot1/front/image_raw")
    jpeg_pub = ros.publisher(CompressedImage, "/rear/image_raw/compressed")
    front = ros.collect(Image, "/robot1/front/semantic/label")
    rear = ros.collect(Image, "/rear/semantic/label")
    try:
        launched.wait_for_output("rviz2 is not installed", 60)
        ready = launched.wait_for_output(READY + r"model (\S+) on cpu.*", 120).group(0)
        assert str(checkpoint) in ready, ready  # topics resolved in the namespace, with their subscription's QoS
        assert re.search(r"/robot1/front/image_raw \[\w+\] -> /robot1/front/semantic/\*", ready), ready
        assert re.search(r"/rear/image_raw/compressed \(compressed\) \[\w+\] -> /rear/semantic/\*", ready), ready
        threads = auto_cpu_threads()  # num_threads 0 on the CPU: all cores but one
        assert f"(fp32, {threads} CPU thread{'s' if threads != 1 else ''})" in ready
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

        # the node's topics, as `ros2 topic list` gets them (the graph; one CLI process less: 3-5 s)
        ros.wait_until(lambda: "/robot1/icnet_node/classes" in dict(ros.node.get_topic_names_and_types()), 30,
                       "the node's topics in the graph")
        topics = dict(ros.node.get_topic_names_and_types())
        for topic in ("/robot1/front/semantic/overlay", "/robot1/front/semantic/camera_info",
                      "/rear/semantic/color", "/rear/semantic/confidence", "/diagnostics"):
            assert topic in topics, sorted(topics)

        # live parameters: `ros2 param set` on the model (each value is checked as at start-up: test_node_process
        # runs those checks in-process, where they are cheap; every ros2 call here costs seconds)
        node = "/robot1/icnet_node"

        # hot swap: a model that is not a model is refused (the reason comes back); the old one serves on
        bad = tmp_path / "broken.safetensors"
        bad.write_bytes(b"not a checkpoint")
        out = ros2_retry(colcon_ws, "param", "set", node, "model", str(bad), ok="Setting parameter")
        assert "Setting parameter failed: cannot load model" in out, out
        front.clear()
        got = _serve(ros, raw_pub, front, lambda stamp: image_msg(img, "rgb8", stamp, frame_id="front"))
        old_label = np.frombuffer(bytes(got.data), np.uint8)
        ros2_retry(colcon_ws, "param", "set", node, "model", str(checkpoint2), ok="Set parameter successful")
        launched.wait_for_output(r"hot swap done in [\d.]+ s: model " + re.escape(str(checkpoint2)), 60)
        front.clear()
        got = _serve(ros, raw_pub, front, lambda stamp: image_msg(img, "rgb8", stamp, frame_id="front"))
        assert not np.array_equal(np.frombuffer(bytes(got.data), np.uint8), old_label)  # the new weights serve

        status, seconds = launched.interrupt(30)  # Ctrl-C: SIGINT to the group (the node gets it twice)
        assert status == 0, launched.output()
        assert_clean_exit(launched, seconds)
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
    ("device:=gpu", "parameter 'device' = 'gpu': must be auto, cpu, cuda, cuda:N, xpu or xpu:N (xpu: an Intel GPU, "
                      "openvino backend)"),
    ("model:=/nonexistent/road.safetensors", "model '/nonexistent/road.safetensors' is not a file"),  # exited 0
    # a substitution rcl does not know: the node started and crashed in rcl (a traceback; respawn loops)
    ("image_topics:=/{foo}/image_raw", "parameter 'image_topics' = ['/{foo}/image_raw']: '/{foo}/image_raw' is not "
                                       "a valid ROS topic name (the substitutions are {node}, {ns} and {namespace})"),
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


def test_a_bad_value_in_the_params_file_ends_the_launch_with_a_failure(colcon_ws: Workspace, tmp_path: Path):
    """A bad value in the params file (not a launch argument) made the node exit 2 while `ros2 launch` exited 0:
    the launch checks the file's values for this node with the node's own rules."""
    params = tmp_path / "bad.yaml"
    params.write_text("/**:\n  ros__parameters:\n    device: gpu\n")
    launched = Launched([*LAUNCH, f"params_file:={params}"], colcon_ws, tmp_path)
    try:
        status = launched.wait(60)
        out = launched.output()
        errors = [line for line in out.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "icnet_node: error: parameter 'device' = 'gpu': must be auto, cpu" in errors[0]
        assert f"(in {params})" in errors[0] and status != 0 and "process started" not in out, out
        assert TRACEBACK not in out, out
    finally:
        launched.kill()


FAKE_RVIZ = """#!{python}
import signal, sys, time
signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
config = sys.argv[sys.argv.index("-d") + 1]
shown = [line.split("Value: ")[1].strip() for line in open(config) if line.strip().startswith("Value: /")]
print("fake rviz2 displays", shown, flush=True)
time.sleep(60)
"""


def _with_fake_rviz(ws: Workspace, tmp_path: Path) -> Workspace:
    """``ws`` with an ament package rviz2 whose executable prints the topics of the config it is given (-d) and
    waits to be stopped (rviz2 is not installed here)."""
    import dataclasses
    import sys

    prefix = tmp_path / "fake_rviz2"
    (prefix / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    (prefix / "share" / "ament_index" / "resource_index" / "packages" / "rviz2").write_text("")
    exe = prefix / "lib" / "rviz2" / "rviz2"
    exe.parent.mkdir(parents=True)
    exe.write_text(FAKE_RVIZ.format(python=sys.executable))
    exe.chmod(0o755)
    env = dict(ws.env, AMENT_PREFIX_PATH=f"{prefix}:{ws.env.get('AMENT_PREFIX_PATH', '')}")
    return dataclasses.replace(ws, env=env)


def test_a_node_that_cannot_start_fails_the_launch(colcon_ws: Workspace, tmp_path: Path):
    """A failure only the node finds (a model file that is not a model) made the node exit 2 while `ros2 launch`
    exited 0, and with rviz:=true kept running with RViz: the launch now ends with the node, RViz too, and fails,
    saying so. RViz's displays show the first camera's topics (they were /camera/... whatever the cameras)."""
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    launched = Launched([*LAUNCH, f"model:={bad}", "device:=cpu", "rviz:=true", "namespace:=perception",
                         "image_topics:=[cam_front/image_raw/compressed, /cam_left/image_raw]"],
                        _with_fake_rviz(colcon_ws, tmp_path), tmp_path)
    try:
        status = launched.wait(60)
        out = launched.output()
        assert status != 0 and "icnet_node: error: cannot load model" in out, out
        assert "icnet_node exited with status 2; the launch ends with it" in out and TRACEBACK not in out, out
        assert ("fake rviz2 displays ['/perception/cam_front/image_raw/compressed', "
                "'/perception/cam_front/semantic/overlay', '/perception/cam_front/semantic/color']") in out, out
    finally:
        launched.kill()


def test_a_bad_rviz_value_ends_the_launch_before_the_node_starts(colcon_ws: Workspace, tmp_path: Path):
    """rviz:=yes failed in the condition after icnet_node had started, and the node outlived `ros2 launch`."""
    launched = Launched([*LAUNCH, "rviz:=yes", "device:=cpu"], colcon_ws, tmp_path)
    try:
        status = launched.wait(60)
        out = launched.output()
        assert status != 0 and "process started" not in out and TRACEBACK not in out, out
        assert 'Argument "rviz" provided value "yes" is not valid' in out, out
    finally:
        launched.kill()


def _transition(ros: RosHarness, node: str, label: str, timeout: float = 30.0) -> None:
    """Trigger lifecycle transition ``label`` through ``NODE/change_state``, as a lifecycle manager does."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    client = ros.node.create_client(ChangeState, f"{node}/change_state")
    try:
        assert client.wait_for_service(timeout_sec=timeout), f"{node}/change_state not found"
        request = ChangeState.Request(transition=Transition(label=label))
        future = client.call_async(request)
        ros.wait_until(future.done, timeout, f"the answer to {label}")
        assert future.result().success, f"{label} failed"
    finally:
        ros.node.destroy_client(client)


@pytest.mark.slow
def test_lifecycle_driven_by_a_manager(colcon_ws: Workspace, ros: RosHarness, checkpoint: Path, tmp_path: Path):
    """`autostart:=false`: the node waits unconfigured; `ros2 lifecycle set` configures it (model loaded); a manager
    (its ChangeState service called over DDS) activates it (frames served), deactivates it (no frames taken) and
    cleans it up (model released); `ros2 lifecycle set` shuts it down (the process ends, and with it the launch).
    The middle transitions skip the CLI: each `ros2 lifecycle set` is a new process that discovers the graph (3-5 s
    here), and the first and last calls already check the CLI against the node. use_sim_time:=true reaches the node
    (the launch file had no such argument: launch ignored it); frames are served without a /clock all the same."""
    launched = Launched([*LAUNCH, "autostart:=false", f"model:={checkpoint}", "device:=cpu", "use_sim_time:=true"],
                        colcon_ws, tmp_path)
    pub = ros.publisher(Image, "/camera/image_raw")
    label = ros.collect(Image, "/camera/semantic/label")
    node = "/icnet_node"
    try:
        launched.wait_for_output("unconfigured: waiting for a lifecycle manager", 60)
        assert "configuring:" not in launched.output()  # no model loaded yet
        ros2_retry(colcon_ws, "param", "get", node, "use_sim_time", ok="Boolean value is: True")
        ros2_retry(colcon_ws, "lifecycle", "set", node, "configure", ok="Transitioning successful")
        launched.wait_for_output(r"configured: model " + re.escape(str(checkpoint)), 10)
        ros.wait_matched(label.subscription)
        img = _frame()
        pub.publish(image_msg(img, "rgb8", ros.now().to_msg()))
        assert not label.wait_for(lambda m: len(m) >= 1, 1), "an inactive node published"

        _transition(ros, node, "activate")
        launched.wait_for_output(READY, 10)
        ros.wait_matched(pub)
        _serve(ros, pub, label, lambda stamp: image_msg(img, "rgb8", stamp))

        _transition(ros, node, "deactivate")
        launched.wait_for_output("inactive: not taking frames", 10)
        label.clear()
        pub.publish(image_msg(img, "rgb8", ros.now().to_msg()))
        assert not label.wait_for(lambda m: len(m) >= 1, 1), "a deactivated node published"

        _transition(ros, node, "cleanup")
        launched.wait_for_output("unconfigured: model released", 10)
        ros2_retry(colcon_ws, "lifecycle", "set", node, "shutdown", ok="Transitioning successful")
        assert launched.wait(30) == 0, launched.output()
        out = launched.output()
        assert re.search(r"\[icnet_node-\d+\]: process has finished cleanly", out) and TRACEBACK not in out, out
    finally:
        launched.kill()
        ros.unsubscribe(label)
        ros.node.destroy_publisher(pub)


@pytest.mark.slow
def test_ros2_run_stops_cleanly_and_reports_a_bad_params_file(colcon_ws: Workspace, checkpoint: Path, tmp_path: Path):
    """`ros2 run icnet_ros icnet_node`: Ctrl-C (SIGINT to the group: ros2 run and the node) ends it with status 0 and
    no traceback; a misspelled --params-file is one line and status 2, not an rcl traceback."""
    out = ros2(colcon_ws, "run", "icnet_ros", "icnet_node", "--ros-args", "--params-file", "config/icnet.yml")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and TRACEBACK not in out.stderr + out.stdout, out
    assert lines == ["icnet_node: error: --params-file 'config/icnet.yml': no such file"], out

    run = Launched(["ros2", "run", "icnet_ros", "icnet_node", "--ros-args", "-p", f"model:={checkpoint}",
                    "-p", "device:=cpu"], colcon_ws, tmp_path, name="run")
    try:
        run.wait_for_output(r"\]: ready: ", 90)
        status, seconds = run.interrupt(30)
        out = run.output()
        assert status == 0 and TRACEBACK not in out and "KeyboardInterrupt" not in out, out
        assert seconds < 5.0, out
    finally:
        run.kill()
