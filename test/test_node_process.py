"""The icnet_node process (icnet_ros/node_process.py): one-line errors for bad ROS arguments, and a clean exit on
SIGINT (once or twice: a terminal and ros2 launch both send one) and SIGTERM in every phase, with real rclpy and
DDS (loopback only): status 0 within 5 s, no traceback. Also the input QoS (input_reliability, the warning when a
publisher's frames do not arrive). `ros2 launch` and `ros2 run` are exercised in test_launch.py."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ros_support
from helpers import make_checkpoint
from ros_support import RosHarness, image_msg, ros  # noqa: F401 - fixture

ros_support.require_rclpy()

from rcl_interfaces.srv import GetParameters  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from icnet_ros.node import input_reliability, no_frames_hint  # noqa: E402
from icnet_ros.node_process import check_ros_args  # noqa: E402

pytestmark = pytest.mark.ros
MODULE = "icnet_ros.node_process"
TRACEBACK = "Traceback (most recent call last)"


def run_node(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", MODULE, *args], capture_output=True, text=True, timeout=timeout,
                          env=ros_support.subprocess_env())


@pytest.mark.parametrize("args,message", [
    (["--ros-args", "--params-file", "/no/such/icnet.yaml"], "--params-file '/no/such/icnet.yaml': no such file"),
    (["--ros-args", "--params-file"], "--params-file needs a file name"),
    (["--ros-args", "--params-fil", "config/icnet.yaml"], "unknown ROS argument(s) ['--params-fil',"),
    (["--ros-args", "-p", "max_batch:=0"], "parameter 'max_batch' = 0: must be in [1, 64]"),
    (["--ros-args", "-p", "warmup:=64x"], "parameter 'warmup' = '64x': must be true, false or frame sizes"),
    (["--ros-args", "-p", "warmup:=96x128;5000x5000", "-p", "device:=cpu"],
     "parameter 'warmup' = '96x128;5000x5000': warmup size 5000x5000 is larger than max_pixels (8294400)"),
    # read by rclpy only when the publisher is made (this one: when the color output is enabled): checked now
    (["--ros-args", "-p", "qos_overrides./camera/semantic/color.publisher.reliability:=bogus"],
     "qos_overrides./camera/semantic/color.publisher.reliability = 'bogus': reliability must be one of "
     "system_default, reliable, best_effort, best_available"),
    (["--ros-args", "-p", "image_topics:=[image_raw, /image_raw/compressed]"],  # one camera (the node is in /)
     "image_topics: 'image_raw' and '/image_raw/compressed' are the same camera (/image_raw)"),
    (["--ros-args", "-p", "image_topics:=[/stereo/left, /stereo/right]"],
     "image_topics: '/stereo/left' and '/stereo/right' would both publish to /stereo/semantic/*"),
    (["--ros-args", "-p", "qos_overrides./camera/image_raw.subscription.depth:=-3"],
     "qos_overrides./camera/image_raw.subscription.depth = -3: depth must be an integer in [0, 10000]"),
    # rclpy's own parameter, refused inside rclpy's Node constructor (was a traceback and status 1: respawn loops)
    (["--ros-args", "-p", "use_sim_time:=5"], "parameter 'use_sim_time': expected a bool, got integer 5"),
    # a substitution rcl does not know (was an RCLError traceback from the node's constructor, status 1)
    (["--ros-args", "-p", 'image_topics:=["/{foo}/image_raw"]'],
     "parameter 'image_topics' = ['/{foo}/image_raw']: '/{foo}/image_raw' is not a valid ROS topic name (the "
     "substitutions are {node}, {ns} and {namespace})"),
    # names that only fail in the node's namespace: '{ns}/x' in '/' is '//x' (was a traceback, status 1)
    (["--ros-args", "-p", 'image_topics:=["{ns}/image_raw"]'],
     "parameter 'image_topics': cannot resolve '{ns}/image_raw' in namespace '/': topic name must not contain "
     "repeated '/'"),
    (["--ros-args", "-p", 'classes_topic:="{ns}/classes"'],
     "parameter 'classes_topic': cannot resolve '{ns}/classes' in namespace '/': topic name must not contain "
     "repeated '/'"),
    # rcl has no --help: the error names the ROS arguments instead of recommending `--ros-args --help` itself
    (["--ros-args", "--help"], "unknown ROS argument(s) ['--help']; the ROS arguments: -p/--param NAME:=VALUE, "
                               "--params-file FILE, -r/--remap FROM:=TO, --log-level LEVEL, -e/--enclave ENCLAVE"),
])
def test_bad_arguments_give_one_line(args: list[str], message: str):
    proc = run_node(args)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[rcl]" not in line]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("icnet_node: error: ") and message in lines[0], proc.stderr
    assert TRACEBACK not in proc.stderr + proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["-h", "--ros-args", "-p", "device:=cpu"]])
def test_help_prints_the_parameters_and_starts_nothing(args: list[str]):
    """`icnet_node --help`: usage and every parameter with its default (the params file), exit 0. Before, rclpy
    ignored the argument and the node started (model loaded, DDS joined) until it was killed."""
    from icnet_ros.node_params import render_params_file
    from icnet_ros.node_process import USAGE

    proc = run_node(args, timeout=30)
    assert proc.returncode == 0 and proc.stdout == USAGE + render_params_file() and not proc.stderr, proc.stderr
    assert proc.stdout.startswith("usage: icnet_node [-h] [--ros-args")


@pytest.mark.parametrize("args,unexpected", [
    (["-p", "model:=/nope.safetensors"], ["-p", "model:=/nope.safetensors"]),
    (["--ros-args", "-p", "device:=cpu", "--", "extra"], ["extra"]),
])
def test_arguments_outside_ros_args_are_refused(args: list[str], unexpected: list[str]):
    """rclpy ignores arguments outside --ros-args: `icnet_node -p model:=/nope.safetensors` ran the default model.
    Now one line saying where ROS arguments go, status 2, before anything starts."""
    proc = run_node(args, timeout=20)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [
        f"icnet_node: error: unexpected argument(s) {unexpected}: ROS arguments go after --ros-args (icnet_node "
        f"--ros-args -p NAME:=VALUE)"], proc.stderr
    assert "configuring" not in proc.stdout + proc.stderr and TRACEBACK not in proc.stdout + proc.stderr


def test_help_names_only_ros_arguments_that_rcl_takes():
    """`icnet_node --help` recommended `--ros-args --help`, which rcl refuses as an unknown ROS argument. It lists
    the ROS arguments instead: each one it names (each spelling, with a value of its kind) is one rcl takes."""
    from rclpy.utilities import remove_ros_args

    from icnet_ros.node_process import ROS_ARGUMENTS

    proc = run_node(["--help"], timeout=30)
    assert proc.returncode == 0 and "--ros-args --help" not in proc.stdout and "ros2 run --help" not in proc.stdout
    samples = {"NAME:=VALUE": "max_batch:=2", "FILE": str(ros_support.REPO / "config" / "icnet.yaml"),
               "FROM:=TO": "image_raw:=/cam/image_raw", "LEVEL": "debug", "ENCLAVE": "/icnet"}
    for argument in ROS_ARGUMENTS:
        assert argument in proc.stdout, argument
        flags, metavar = argument.split(" ")
        for flag in flags.split("/"):
            assert remove_ros_args(["icnet_node", "--ros-args", flag, samples[metavar]]) == ["icnet_node"], flag


def test_params_file_checks(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters:\n    image_topics: [/a\n")
    assert "not valid YAML (line" in check_ros_args(["x", "--ros-args", "--params-file", str(bad)])
    flat = tmp_path / "flat.yaml"
    flat.write_text("max_batch: 2\n")
    assert "expected '<node name or /**>: ros__parameters" in check_ros_args(["x", "--ros-args", "--params-file",
                                                                              str(flat)])
    assert check_ros_args(["x", "--ros-args", "--params-file", "config/icnet.yaml"]) is None
    nested = tmp_path / "nested.yaml"  # the node under its namespace, as rcl accepts it
    nested.write_text("robot1:\n  front:\n    icnet_node:\n      ros__parameters:\n        max_batch: 3\n"
                      "/**:\n  ros__parameters:\n    device: cpu\n")
    assert check_ros_args(["x", "--ros-args", "--params-file", str(nested)]) is None
    empty_ns = tmp_path / "empty_ns.yaml"
    empty_ns.write_text("robot1:\n  icnet_node: {}\n")
    assert "expected '<node name or /**>: ros__parameters" in check_ros_args(["x", "--ros-args", "--params-file",
                                                                              str(empty_ns)])
    assert check_ros_args(["x"]) is None


def test_input_reliability_follows_the_publishers():
    assert input_reliability([]) == "best_effort"  # no publisher yet: sensor data
    assert input_reliability(["reliable"]) == "reliable"
    assert input_reliability(["reliable", "reliable"]) == "reliable"
    assert input_reliability(["reliable", "best_effort"]) == "best_effort"  # reliable would not match it
    hint = no_frames_hint("/cam/image_raw", 1, "best_effort")
    assert "qos_overrides./cam/image_raw.subscription.reliability: reliable" in hint and "512 KiB" in hint


class NodeRun:
    """One node process in its own process group, output to a file; ``script``: a Python file to run instead of
    the icnet_node module (a wrapper around node_process.main)."""

    def __init__(self, args: list[str], log: Path, script: Path | None = None) -> None:
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115 - closed in close()
        program = [str(script)] if script is not None else ["-m", MODULE]
        self.proc = subprocess.Popen([sys.executable, *program, "--ros-args", *args], stdout=self._file,
                                     stderr=subprocess.STDOUT, env=ros_support.subprocess_env(),
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} (status {self.proc.poll()}):\n{self.output()}")
            time.sleep(0.02)

    def stop(self, sig: int, times: int) -> tuple[int, float]:
        t0 = time.monotonic()
        for _ in range(times):
            os.killpg(self.proc.pid, sig)
            time.sleep(0.05)
        try:
            status = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after the signal:\n{self.output()}")
        return status, time.monotonic() - t0

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._file.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("node_process") / "tiny.safetensors")


#: icnet_node whose forward passes of frames (on the inference thread, not the warm-up) block for 60 s, after
#: printing FORWARD_STARTED: a forward pass in flight for as long as a test needs, on any machine
SLOW_FORWARD_NODE = """
import sys
import threading
import time

from icnet_ros import engine, node_process

real = engine.Segmenter.forward


def forward(self, x):
    if threading.current_thread().name == "icnet_inference":
        print(f"test: forward pass started ({tuple(x.shape)})", flush=True)
        time.sleep(60)
    return real(self, x)


engine.Segmenter.forward = forward
sys.exit(node_process.main())
"""
FORWARD_STARTED = "test: forward pass started"


def _call(ros: RosHarness, srv_type: Any, name: str, request: Any, timeout: float = 30.0) -> Any:
    """Call service ``name`` of a node in another process; its response."""
    client = ros.node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=timeout), f"{name} not found"
        future = client.call_async(request)
        ros.wait_until(future.done, timeout, f"the answer of {name}")
        return future.result()
    finally:
        ros.node.destroy_client(client)


def test_a_requested_shutdown_after_a_failed_later_configure_exits_0(ros: RosHarness, tmp_path: Path,
                                                                      checkpoint: Path):
    """Autostart, then a lifecycle manager's deactivate, cleanup, a model that does not load, a configure that fails
    and a shutdown: the process ends with status 0 (the end that was asked for). It exited 2 and printed the failed
    configure's error as if the start had failed, and launch reported the node as died."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    def transition(label: str) -> bool:
        request = ChangeState.Request(transition=Transition(label=label))
        return _call(ros, ChangeState, "/lc/icnet_node/change_state", request).success

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    run = NodeRun(["-r", "__ns:=/lc", "-p", f"model:={checkpoint}", "-p", "device:=cpu", "-p", "num_threads:=1",
                   "-p", "image_topics:=[/lc/image_raw]"], tmp_path / "node.log")
    try:
        run.wait_for(r"\]: ready: ")
        assert transition("deactivate") and transition("cleanup")
        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(bad))
        result = _call(ros, SetParameters, "/lc/icnet_node/set_parameters",
                       SetParameters.Request(parameters=[Parameter(name="model", value=value)])).results[0]
        assert result.successful, result.reason
        assert not transition("configure")  # the model does not load
        assert transition("shutdown")
        status = run.proc.wait(30)
        out = run.output()
        assert status == 0 and "icnet_node: error:" not in out and "Traceback" not in out, out
    finally:
        run.close()


@pytest.mark.slow
@pytest.mark.parametrize("phase,sig,times", [
    ("start-up", signal.SIGINT, 2),
    ("model load", signal.SIGINT, 2),
    ("ready", signal.SIGTERM, 1),  # SIGINT when ready: test_launch.py (Ctrl-C under ros2 launch)
    ("forward pass", signal.SIGINT, 2),
])
def test_signal_in_every_phase_exits_cleanly(ros: RosHarness, tmp_path: Path, phase: str, sig: int, times: int):
    """Status 0 within 5 s and no traceback, whatever the node is doing when the signal(s) arrive. A forward pass
    cannot be interrupted: in the "forward pass" phase the node (SLOW_FORWARD_NODE) blocks in the forward pass of
    the frame sent, the signals go out once it has started and before any label came, and the node exits without
    waiting for it (and says so)."""
    args = ["-p", "device:=cpu", "-p", "num_threads:=1", "-p", "image_topics:=[/sig/image_raw]"]
    script = None
    if phase == "forward pass":
        script = tmp_path / "slow_forward_node.py"
        script.write_text(SLOW_FORWARD_NODE)
    run = NodeRun(args, tmp_path / "node.log", script)
    label = pub = None
    try:
        if phase == "start-up":
            time.sleep(0.3)  # interpreter start-up, imports, rclpy.init
        elif phase == "model load":
            run.wait_for("configuring: loading")
        else:
            run.wait_for(r"\]: ready: ")
        if phase == "forward pass":
            label = ros.collect(Image, "/sig/semantic/label")
            pub = ros.publisher(Image, "/sig/image_raw")
            ros.wait_matched(pub)
            ros.wait_matched(label.subscription)
            img = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
            for _ in range(10):  # best-effort input, lazy outputs: a frame may be lost to discovery
                pub.publish(image_msg(img, "rgb8", ros.now().to_msg()))
                deadline = time.monotonic() + 2.0
                while FORWARD_STARTED not in run.output() and time.monotonic() < deadline:
                    time.sleep(0.02)
                if FORWARD_STARTED in run.output():
                    break
            assert FORWARD_STARTED in run.output(), f"no forward pass started:\n{run.output()}"
            assert not label.messages, "the forward pass ended before the signal"
        status, seconds = run.stop(sig, times)
        out = run.output()
        assert status == 0, out
        assert TRACEBACK not in out and "KeyboardInterrupt" not in out, out
        assert seconds < 5.0, f"{seconds:.1f} s:\n{out}"
        if phase == "forward pass":
            assert "exiting without waiting for the forward pass" in out, out
            assert not label.messages
        print(f"{phase}, {signal.Signals(sig).name} x{times}: exit status {status} after {seconds:.2f} s")
    finally:
        run.close()
        if label is not None:
            ros.unsubscribe(label)
        if pub is not None:
            ros.node.destroy_publisher(pub)


@pytest.mark.slow
def test_input_qos_follows_a_reliable_camera_and_warns_when_frames_do_not_arrive(
        ros: RosHarness, checkpoint: Path, tmp_path: Path):
    """A reliable camera publisher that exists before the node starts: the node subscribes reliable (its large
    frames arrive whole), and follows one that appears later. A best-effort publisher that exists but sends nothing:
    after a few seconds the node warns with the likely cause and the fix. qos_overrides fixes a subscription's
    reliability (no following) and sets depths; an override for a topic or entity the node does not have (a typo,
    a topic from another image_topics) is named in a warning (it was ignored silently), rclpy's own parameters in
    the file are not "unknown"."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    reliable_pub = ros.publisher(Image, "/qa/image_raw", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    silent_pub = ros.publisher(Image, "/qb/image_raw", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    params = tmp_path / "params.yaml"
    params.write_text("/**:\n  ros__parameters:\n    start_type_description_service: true\n    qos_overrides:\n"
                      "      /qc/image_raw:\n        subscription:\n          reliability: reliable\n          depth: 3\n"
                      "        publisher:\n          depth: 3\n"
                      "      /qc/image_row:\n        subscription:\n          depth: 3\n"
                      "      /qb/seg_color:\n        publisher:\n          depth: 3\n"
                      "      /qb/semantic/color:\n        publisher:\n          depth: 3\n")
    run = NodeRun(["--params-file", str(params), "-p", f"model:={checkpoint}", "-p", "device:=cpu",
                   "-p", "image_topics:=[/qa/image_raw, /qb/image_raw, /qc/image_raw, /qd/image_raw]",
                   "-r", "/qb/semantic/color:=/qb/seg_color"], tmp_path / "node.log")
    late_pub = None
    label = ros.collect(Image, "/qa/semantic/label")
    try:
        run.wait_for(r"\]: ready: ")
        out = run.output()
        assert "/qb/image_raw [best_effort]" in out, out
        assert "/qc/image_raw [reliable]" in out, out  # from qos_overrides (no publisher)
        warnings = [line for line in out.splitlines() if "ignoring" in line]  # (in the file's order)
        assert len(warnings) == 3, out
        assert "ignoring qos_overrides./qc/image_raw.publisher.depth: this node has no publisher on /qc/image_raw" \
               in warnings[0], out
        assert "ignoring qos_overrides./qc/image_row.subscription.depth: this node has no subscription on " \
               "/qc/image_row (subscriptions: /qa/image_raw, /qb/image_raw, /qc/image_raw, /qd/image_raw; " \
               "publishers: /qa/semantic/camera_info, " in warnings[1], out
        # a remapped output: its override is under the name it has (/qb/seg_color), not the one it would have had
        assert "ignoring qos_overrides./qb/semantic/color.publisher.depth: this node has no publisher on " \
               "/qb/semantic/color" in warnings[2] and "/qb/seg_color, " in warnings[2], out
        if "/qa/image_raw [reliable]" not in out:  # not discovered at activation yet: followed within a second
            run.wait_for(r"/qa/image_raw: publisher\(s\) \['reliable'\]: subscribing reliable", 30)
        ros.wait_matched(label.subscription)
        ros.wait_matched(reliable_pub)
        time.sleep(0.5)
        img = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
        for _ in range(3):  # reliable: the first one arrives unless it was sent during the switch
            reliable_pub.publish(image_msg(img, "rgb8", ros.now().to_msg()))
            if label.wait_for(lambda m: len(m) >= 1, 10):
                break
        assert label.messages, run.output()
        run.wait_for(r"/qb/image_raw: 1 publisher\(s\) but no frame received for 5 s\. Likely cause: frames too "
                     r"large for best-effort DDS", 30)
        # a reliable camera that appears after the node: the subscription follows (new one first, then the old goes)
        late_pub = ros.publisher(Image, "/qd/image_raw", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        run.wait_for(r"/qd/image_raw: publisher\(s\) \['reliable'\]: subscribing reliable \(was best_effort\)", 30)
        infos = ros.node.get_subscriptions_info_by_topic("/qc/image_raw")
        assert [i.qos_profile.reliability for i in infos] == [ReliabilityPolicy.RELIABLE], infos
        client = ros.node.create_client(GetParameters, "/icnet_node/get_parameters")
        try:  # the override is a declared (read-only) parameter, as for any node using qos_overrides
            assert client.wait_for_service(timeout_sec=10)
            res = client.call(GetParameters.Request(names=["qos_overrides./qc/image_raw.subscription.depth",
                                                           "qos_overrides./qa/semantic/label.publisher.reliability"]),
                              timeout_sec=10)
        finally:
            ros.node.destroy_client(client)
        assert [res.values[0].integer_value, res.values[1].string_value] == [3, "reliable"], res
        status, _ = run.stop(signal.SIGINT, 1)
        assert status == 0 and TRACEBACK not in run.output()
    finally:
        run.close()
        ros.unsubscribe(label)
        ros.node.destroy_publisher(reliable_pub)
        ros.node.destroy_publisher(silent_pub)
        if late_pub is not None:
            ros.node.destroy_publisher(late_pub)


@pytest.mark.slow
def test_camera_info_is_paired_by_stamp_and_scaled(ros: RosHarness, checkpoint: Path, tmp_path: Path):
    """Two camera_infos with different stamps and calibrations; a frame stamped like the older one gets that one
    (not the newest), scaled by the label/image size ratio (output_size model, input_size 64x96: 120x160 ->
    64x96), with the image's header. A compressed camera's image size comes from its JPEG header, so its
    camera_info is served too when that is uncalibrated (0x0: it stays so)."""
    import cv2
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, CompressedImage

    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub = ros.publisher(Image, "/ci/image_raw", reliable)
    info_pub = ros.publisher(CameraInfo, "/ci/camera_info", reliable)
    jpeg_pub = ros.publisher(CompressedImage, "/cj/image_raw/compressed", reliable)
    jpeg_info_pub = ros.publisher(CameraInfo, "/cj/camera_info", reliable)
    info_out = ros.collect(CameraInfo, "/ci/semantic/camera_info")
    jpeg_info_out = ros.collect(CameraInfo, "/cj/semantic/camera_info")
    label = ros.collect(Image, "/ci/semantic/label")
    jpeg_label = ros.collect(Image, "/cj/semantic/label")  # a camera is served while one of its images is watched
    run = NodeRun(["-p", f"model:={checkpoint}", "-p", "device:=cpu",
                   "-p", "image_topics:=[/ci/image_raw, /cj/image_raw/compressed]",
                   "-p", "output_size:=model", "-p", "input_size:=64x96"], tmp_path / "n.log")
    try:
        run.wait_for(r"\]: ready: ")
        for entity in (pub, info_pub, jpeg_pub, jpeg_info_pub, info_out.subscription, jpeg_info_out.subscription,
                       label.subscription, jpeg_label.subscription):
            ros.wait_matched(entity)
        t_old, t_new = ros.now().to_msg(), ros.now().to_msg()
        t_new.sec += 1
        img = np.random.default_rng(2).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        jpeg = CompressedImage(format="jpeg", data=cv2.imencode(".jpg", img)[1].tobytes())
        jpeg.header.stamp, jpeg.header.frame_id = t_old, "cj"
        for _ in range(3):  # all again if nothing came back (seen in CI after other node tests in the same
            for stamp, fx in ((t_old, 100.0), (t_new, 200.0)):  # process: a matched subscription missing samples)
                info = CameraInfo(width=160, height=120, k=[fx, 0, 80.0, 0, fx, 60.0, 0, 0, 1.0],
                                  p=[fx, 0, 80.0, 0, 0, fx, 60.0, 0, 0, 0, 1.0, 0])
                info.header.stamp, info.header.frame_id = stamp, "ci"
                info_pub.publish(info)
            uncalibrated = CameraInfo()
            uncalibrated.header.stamp, uncalibrated.header.frame_id = t_old, "cj"
            jpeg_info_pub.publish(uncalibrated)
            time.sleep(0.5)
            pub.publish(image_msg(img, "rgb8", t_old, frame_id="ci"))
            jpeg_pub.publish(jpeg)
            if info_out.wait_for(lambda m: len(m) >= 1, 10) and jpeg_info_out.wait_for(lambda m: len(m) >= 1, 10):
                break
        assert info_out.messages and jpeg_info_out.messages, run.output()
        out = info_out.messages[0]
        lab = label.messages[0] if label.wait_for(lambda m: len(m) >= 1, 10) else None
        assert lab is not None and (lab.height, lab.width) == (64, 96), lab
        assert (out.header.stamp.sec, out.header.stamp.nanosec) == (t_old.sec, t_old.nanosec)
        assert out.header.frame_id == "ci" and (out.width, out.height) == (96, 64)
        np.testing.assert_allclose(out.k, [100.0 * 96 / 160, 0, 80.0 * 96 / 160, 0, 100.0 * 64 / 120,
                                           60.0 * 64 / 120, 0, 0, 1.0])
        j = jpeg_info_out.messages[0]
        assert j.header.frame_id == "cj" and (j.width, j.height) == (0, 0) and not any(j.k)
    finally:
        run.close()
        for collector in (info_out, jpeg_info_out, label, jpeg_label):
            ros.unsubscribe(collector)
        for publisher in (pub, info_pub, jpeg_pub, jpeg_info_pub):
            ros.node.destroy_publisher(publisher)


@contextlib.contextmanager
def _in_process_node(overrides: list) -> Iterator[Any]:
    """A SegmentationNode in this process (not started: tests drive its transitions) with the parameter overrides
    ``overrides``, in a context of its own; destroyed, and the context shut down, after the block."""
    import rclpy

    from icnet_ros.node import SegmentationNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = SegmentationNode(start=False, context=ctx, parameter_overrides=overrides)
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")])])
def test_lifecycle_in_process_frees_the_model_and_refuses_other_classes(checkpoint: Path, tmp_path: Path,
                                                                        device: str):
    """The node's transitions called in-process: configure builds the Segmenter, cleanup closes it (on CUDA its
    memory goes back), a hot swap to a model with other classes is refused with the reason and changes nothing."""
    import torch
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from icnet_ros.checkpoint import load_model, save_checkpoint

    other = make_checkpoint(tmp_path / "other_classes.safetensors", num_classes=5)
    overrides = [
        Parameter("model", value=str(checkpoint)), Parameter("device", value=device),
        Parameter("image_topics", value=["/lc/image_raw"])]
    with _in_process_node(overrides) as node:
        assert node.segmenter is None and node.pipeline is None
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        seg = node.segmenter
        assert seg is not None and node.pipeline is not None and not node.pipeline.running
        if device == "cuda":
            assert torch.cuda.memory_allocated() > base
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS and node.pipeline.running
        result = node.set_parameters([Parameter("model", value=str(other))])[0]
        assert not result.successful and "the model has 5 classes, this node announced 11" in result.reason
        recolored = load_model(checkpoint)  # the same classes in other colors: the classes.* parameters would lie
        meta = {**recolored.meta, "palette": [[255 - v for v in c] for c in recolored.meta["palette"]]}
        save_checkpoint(recolored, tmp_path / "recolored.safetensors", meta)
        result = node.set_parameters([Parameter("model", value=str(tmp_path / "recolored.safetensors"))])[0]
        assert not result.successful and "class colors or ignore index differ" in result.reason, result
        assert node.segmenter is seg and node.get_parameter("model").value == str(checkpoint)
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS and not node.pipeline.running
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert node.segmenter is None and node.pipeline is None and node.cameras == []
        if device == "cuda":
            assert torch.cuda.memory_allocated() <= base
        # the class set is the node's for its lifetime, also across cleanup; the refusal names the first difference
        # (it said "the model's 11 classes differ from the 11 this node announced")
        renamed = load_model(checkpoint)
        names = list(renamed.meta["classes"])
        save_checkpoint(renamed, tmp_path / "renamed.safetensors",
                        {**renamed.meta, "classes": [names[0], "heaven", *names[2:]]})
        assert node.set_parameters([Parameter("model", value=str(tmp_path / "renamed.safetensors"))])[0].successful
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.startup_error.startswith(f"the model's class 1 is 'heaven', this node announced {names[1]!r} "
                                             "(class ids would change"), node.startup_error


def test_overlapping_subscriptions_take_each_frame_once_in_order(checkpoint: Path):
    """While a camera's image subscription is replaced (a reliability switch), the old one serves until the new one
    has matched, and each frame arrives on both, in either order. Before, only an exact repeat of the last frame was
    skipped: with the new reader one frame behind (old N+1, new N, old N+2, new N+1, ...) every frame was segmented
    twice and published older-after-newer. Now the old subscription's frames stop once the new one has delivered,
    and a stamped frame is taken only when newer than the newest taken; the real subscriptions' callbacks are
    called with the frames, and what reaches the pipeline is recorded."""
    from builtin_interfaces.msg import Time
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    overrides = [Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
                 Parameter("image_topics", value=["/ov/image_raw"])]
    with _in_process_node(overrides) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        (cam,) = node.cameras
        taken: list[tuple[int, str]] = []
        submit = node.pipeline.submit
        node.pipeline.submit = lambda topic, msg: (taken.append((msg.header.stamp.sec, msg.header.frame_id)),
                                                   submit(topic, msg))
        old = cam.subscription
        node._subscribe(cam)  # what _watch_cameras does on a switch: the new subscription, the old one retiring
        cam.retiring = old
        new = cam.subscription
        assert new is not old

        def msg(sec: int, frame_id: str = "cam") -> Image:
            return image_msg(np.zeros((8, 8, 3), np.uint8), "rgb8", Time(sec=sec), frame_id)

        old.callback(msg(1))  # only the old one delivers at first
        old.callback(msg(2))
        for n in range(3, 8):  # the new reader one frame behind the old one
            old.callback(msg(n))
            new.callback(msg(n - 1))
        new.callback(msg(7))
        new.callback(msg(8))
        old.callback(msg(9))  # after the new one has delivered: the old one's frames are not taken
        new.callback(msg(9))
        old.callback(msg(0))  # unstamped, from the old one: not taken either
        new.callback(msg(5, "other"))  # another frame_id has its own order
        assert taken == [(1, "cam"), (2, "cam"), (3, "cam"), (4, "cam"), (5, "cam"), (6, "cam"), (7, "cam"),
                         (8, "cam"), (9, "cam"), (5, "other")], taken
        new.callback(msg(1))  # time jumps back (a bag replayed in a loop): the new one's frames are still taken
        new.callback(msg(2))  # (before: refused as copies, and not counted anywhere, until the old one went)
        assert taken[-2:] == [(1, "cam"), (2, "cam")], taken
        # the overlap ended: every frame is taken again, as delivered
        cam.retiring = None
        node.destroy_subscription(old)
        new.callback(msg(3))
        assert taken[-1] == (3, "cam")
        # another switch; time jumps back while only the old subscription delivers: taken too
        older = cam.subscription
        node._subscribe(cam)
        cam.retiring = older
        cam.overlap_stamps.clear()  # (as _watch_cameras does on a switch)
        newer = cam.subscription
        del taken[:]
        older.callback(msg(100))
        older.callback(msg(50))
        newer.callback(msg(50))  # a copy of the old one's last frame
        newer.callback(msg(51))
        newer.callback(msg(10))
        assert taken == [(100, "cam"), (50, "cam"), (51, "cam"), (10, "cam")], taken


def test_services_and_the_simulated_clock_are_served_during_a_hot_swap(checkpoint: Path, tmp_path: Path):
    """A model hot swap runs in the set_parameters callback (here made 3 s long). The parameter and lifecycle
    services and /clock were in rclpy's default (mutually exclusive) callback group with it: get_state and
    get_parameters went unanswered for the whole swap (a lifecycle manager's timeout) and the simulated clock stood
    still (frames served meanwhile looked stamped by another clock). Now they are answered during it, the clock
    follows /clock, and a change through another service is refused at once with the reason, while a second
    request to the same set service waits its turn (both set overrides had held the parameter table's lock for the
    whole swap: list_parameters waited, and two pending lists took every executor thread)."""
    import rclpy
    from builtin_interfaces.msg import Time
    from lifecycle_msgs.srv import GetState
    from rcl_interfaces.srv import ListParameters, SetParameters, SetParametersAtomically
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rosgraph_msgs.msg import Clock

    from icnet_ros.node import SegmentationNode

    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    ctx, client_ctx = rclpy.Context(), rclpy.Context()
    rclpy.init(context=ctx)
    rclpy.init(context=client_ctx)
    node = SegmentationNode("icnet_busy", context=ctx, parameter_overrides=[
        Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
        Parameter("image_topics", value=["/busy/image_raw"]), Parameter("use_sim_time", value=True)])
    executor = MultiThreadedExecutor(num_threads=3, context=ctx)  # as icnet_node's process
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    client = rclpy.create_node("busy_client", context=client_ctx)
    client_exec = SingleThreadedExecutor(context=client_ctx)
    client_exec.add_node(client)
    try:
        loading = threading.Event()
        load = node._load_segmenter

        def slow_load(config):
            loading.set()
            time.sleep(3.0)
            return load(config)

        node._load_segmenter = slow_load
        set_params = client.create_client(SetParameters, "/icnet_busy/set_parameters")
        set_atomically = client.create_client(SetParametersAtomically, "/icnet_busy/set_parameters_atomically")
        get_params = client.create_client(GetParameters, "/icnet_busy/get_parameters")
        list_params = [client.create_client(ListParameters, "/icnet_busy/list_parameters") for _ in range(2)]
        get_state = client.create_client(GetState, "/icnet_busy/get_state")
        clock = client.create_publisher(Clock, "/clock", 10)
        for c in (set_params, set_atomically, get_params, get_state, *list_params):
            assert c.wait_for_service(timeout_sec=10)

        def call(c, request, timeout):
            future = c.call_async(request)
            client_exec.spin_until_future_complete(future, timeout_sec=timeout)
            return future.result() if future.done() else None

        swap = set_params.call_async(SetParameters.Request(
            parameters=[Parameter("model", value=str(other)).to_parameter_msg()]))
        deadline = time.monotonic() + 10
        while not loading.is_set() and time.monotonic() < deadline:
            client_exec.spin_once(timeout_sec=0.05)
        assert loading.is_set()
        t0 = time.monotonic()
        listed = [c.call_async(ListParameters.Request()) for c in list_params]
        for future in listed:
            client_exec.spin_until_future_complete(future, timeout_sec=1.5)
            assert future.done() and "model" in future.result().result.names, "list_parameters unanswered"
        state = call(get_state, GetState.Request(), 1.5)
        assert state is not None and state.current_state.label == "active", "get_state unanswered during the swap"
        values = call(get_params, GetParameters.Request(names=["model"]), 1.5)
        assert values is not None and values.values[0].string_value == str(checkpoint)
        refused = call(set_atomically, SetParametersAtomically.Request(
            parameters=[Parameter("max_age", value=2.0).to_parameter_msg()]), 1.5)
        assert refused is not None and not refused.result.successful
        assert refused.result.reason.startswith("busy: loading a model (hot swap) in progress"), refused
        queued = set_params.call_async(SetParameters.Request(
            parameters=[Parameter("max_age", value=3.0).to_parameter_msg()]))  # the swap's own service: in turn
        for sec in (100, 101):  # the node's clock follows /clock meanwhile
            clock.publish(Clock(clock=Time(sec=sec)))
            deadline = time.monotonic() + 1.5
            while node.get_clock().now().nanoseconds != sec * 10**9 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert node.get_clock().now().nanoseconds == sec * 10**9
        assert time.monotonic() - t0 < 3.0 and not swap.done()  # all of it while the swap was still loading
        client_exec.spin_until_future_complete(swap, timeout_sec=60)
        assert swap.result().results[0].successful
        client_exec.spin_until_future_complete(queued, timeout_sec=30)
        assert queued.done() and queued.result().results[0].successful
        assert node.get_parameter("model").value == str(other) and node.get_parameter("max_age").value == 3.0
    finally:
        executor.shutdown(timeout_sec=5)
        node.destroy_node()
        client.destroy_node()
        rclpy.try_shutdown(context=ctx)
        rclpy.try_shutdown(context=client_ctx)


def test_parameter_services_beside_transitions_neither_crash_nor_diverge(checkpoint: Path, tmp_path: Path):
    """The parameter services run beside the transitions (the reentrant default group). rclpy's list_parameters
    iterates its parameter table while the first configure declares into it (classes.*, qos_overrides.*): a
    RuntimeError ('dictionary changed size during iteration') that ended the executor, exit status 1; and a set
    stores its value after the node's callback returned, so two sets at once could leave the parameter at one
    value and the running config at the other. Forced here with a short thread switch interval."""
    from rclpy.parameter import Parameter

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for i in range(3):
            with _in_process_node([Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
                                   Parameter("image_topics", value=["/pl/image_raw", "/pm/image_raw"]),
                                   Parameter("warmup", value="false")]) as node:
                stop, errors = threading.Event(), []

                def lister():
                    while not stop.is_set():
                        try:
                            node.list_parameters([], 0)
                        except RuntimeError as e:
                            errors.append(e)

                thread = threading.Thread(target=lister)
                thread.start()
                try:
                    node.trigger_configure()
                finally:
                    stop.set()
                    thread.join()
                assert not errors, errors[0]
                if i:
                    continue
                node.trigger_activate()
                diverged = []
                for n in range(300):
                    barrier = threading.Barrier(2)

                    def setter(value):
                        barrier.wait()
                        node.set_parameters_atomically([Parameter("max_age", value=value)])

                    pair = [threading.Thread(target=setter, args=(v,)) for v in (1.0 + n % 40, 100.0 + n % 30)]
                    for t in pair:
                        t.start()
                    for t in pair:
                        t.join()
                    if node.get_parameter("max_age").value != node.config.max_age:
                        diverged.append((node.get_parameter("max_age").value, node.config.max_age))
                assert not diverged, diverged[:3]
    finally:
        sys.setswitchinterval(interval)


def test_start_is_one_change_and_a_busy_refusal_is_no_failure(checkpoint: Path, tmp_path: Path):
    """start() released the change lock between its configure and its activate: a parameter change arriving
    there (a hot swap) made the activate 'busy', and icnet_node exited with status 2, the node inactive. Now the
    change is refused during the start. A transition refused as busy was recorded as a failed start: /diagnostics
    then reported ERROR 'activate failed: busy ...' after a later, successful transition."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    with _in_process_node([Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
                           Parameter("image_topics", value=["/sb/image_raw"])]) as node:
        activate, refused = node.trigger_activate, []

        def change_then_activate():  # in the gap: a `ros2 param set model ...` from another thread
            t = threading.Thread(target=lambda: refused.append(
                node.set_parameters_atomically([Parameter("model", value=str(other))])))
            t.start()
            t.join(30)
            return activate()

        node.trigger_activate = change_then_activate
        node.start()  # (raised StartupError 'busy: ...')
        node.trigger_activate = activate
        assert not refused[0].successful and refused[0].reason.startswith("busy: "), refused
        assert node._active and node.get_parameter("model").value == str(checkpoint)
        # a deactivate refused during a hot swap is not a failure of the node's
        loading, load = threading.Event(), node._load_segmenter

        def slow_load(config):
            loading.set()
            time.sleep(1.0)
            return load(config)

        node._load_segmenter = slow_load
        swap = threading.Thread(target=lambda: node.set_parameters_atomically([Parameter("model", value=str(other))]))
        swap.start()
        assert loading.wait(30)
        assert node.trigger_deactivate() == TransitionCallbackReturn.FAILURE
        swap.join(60)
        assert node.get_parameter("model").value == str(other)
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        sent = []
        node._diag_pub.publish = sent.append
        node._publish_diagnostics()
        status = next(s for s in sent[0].status if s.name.endswith(": segmenter"))
        assert status.level == DiagnosticStatus.OK and "failed" not in status.message, status


def test_the_default_group_runs_entities_side_by_side_but_each_one_in_turn():
    """The node's default callback group (its services, /clock): rclpy's reentrant group let one entity's callbacks
    overlap (two /clock messages applied out of order, the clock stepping back); its mutually exclusive group ran
    one callback of the whole group at a time (every service waited for a hot swap). Here a slow timer never
    overlaps itself on a 3-thread executor, while another entity of the group runs meanwhile."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from icnet_ros.node import EntityExclusiveCallbackGroup

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("entity_group", context=ctx)
    group = EntityExclusiveCallbackGroup()
    lock, running, most, beside = threading.Lock(), [0], [0], []

    def slow():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    def quick():
        with lock:
            beside.append(running[0])

    node.create_timer(0.001, slow, callback_group=group)
    node.create_timer(0.01, quick, callback_group=group)
    executor = MultiThreadedExecutor(num_threads=3, context=ctx)
    executor.add_node(node)
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    assert most[0] == 1, most  # the slow timer never ran twice at once
    assert any(beside), beside  # the quick one ran while the slow one did
    # an entity whose ending_execution never came (rclpy skips it when a waitable's take fails on a destroyed
    # handle): entities were listed by id, so a new entity at its freed address could never run
    group, gone = EntityExclusiveCallbackGroup(), object()
    assert group.beginning_execution(gone) and not group.can_execute(gone)
    del gone
    assert all(group.can_execute(object()) for _ in range(1000))


def test_a_frame_from_before_deactivate_is_not_served_after_activate(checkpoint: Path):
    """The pipeline keeps the newest pending frame across a stop; on deactivate that frame was served at the next
    activate, seconds or minutes later with its old stamp (or logged as too_old). Now deactivate drops it, counted
    as 'deactivated'."""
    from builtin_interfaces.msg import Time
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    overrides = [Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
                 Parameter("image_topics", value=["/da/image_raw"]), Parameter("max_age", value=0.0)]
    with _in_process_node(overrides) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        node.pipeline.stop()  # the worker busy elsewhere: the frame stays pending, as one arriving in a long batch
        node._on_image("/da/image_raw", image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8", Time(sec=5)))
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        time.sleep(0.5)
        cam = node.pipeline.snapshot()["cameras"]["/da/image_raw"]
        assert cam["received"] == 1 and cam["processed"] == 0 and cam["dropped"] == {"deactivated": 1}, cam
        sent = []  # and it is no bad frame on /diagnostics (a WARN after every pause)
        node._diag_pub.publish = sent.append
        node._publish_diagnostics()
        status = next(s for s in sent[0].status if s.name.endswith("/da/image_raw"))
        assert "bad frames" not in status.message, status


def test_a_refused_change_keeps_the_outputs_while_it_runs(checkpoint: Path, tmp_path: Path):
    """An atomic change of outputs (dropping color) with a model hot swap that is then refused (other classes):
    the color publisher was destroyed before the swap (no color frames for its whole length, minutes for a large
    warm-up or an engine build) and a new one made afterwards. Now the withdrawn outputs go only once the change
    is applied: the same publisher serves throughout, and after a change that is applied, it is gone."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    other = make_checkpoint(tmp_path / "five_classes.safetensors", num_classes=5)
    overrides = [Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
                 Parameter("image_topics", value=["/rc/image_raw"]), Parameter("outputs", value=["label", "color"])]
    with _in_process_node(overrides) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        (cam,) = node.cameras
        color = cam.publishers["color"]
        during = []
        load = node._load_segmenter
        node._load_segmenter = lambda config: (during.append(dict(cam.publishers)), load(config))[1]
        result = node.set_parameters_atomically([Parameter("outputs", value=["label", "overlay"]),
                                                 Parameter("model", value=str(other))])
        assert not result.successful and "this node announced 11" in result.reason, result
        assert during and during[0]["color"] is color and "overlay" in during[0]  # the added one advertised first
        assert set(cam.publishers) == {"label", "color"} and cam.publishers["color"] is color
        assert node.set_parameters_atomically([Parameter("outputs", value=["label"])]).successful
        assert set(cam.publishers) == {"label"}


def test_outputs_change_at_run_time(checkpoint: Path):
    """`outputs` is live: setting it to [label] withdraws the other publishers, setting more back advertises them.
    Before, [label] (the engine option's own default) counted as 'unchanged': success reported, nothing withdrawn,
    colour still computed and published. What the node computes follows who listens, camera_info included."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    overrides = [
        Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
        Parameter("image_topics", value=["/oc/image_raw"]), Parameter("outputs", value=["label", "color"])]
    with _in_process_node(overrides) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        (cam,) = node.cameras
        assert set(cam.publishers) == {"label", "color"}
        assert node.set_parameters([Parameter("outputs", value=["label"])])[0].successful
        assert set(cam.publishers) == {"label"} and node.config.outputs == ("label",)
        assert node.set_parameters([Parameter("outputs", value=["label", "overlay"])])[0].successful
        assert set(cam.publishers) == {"label", "overlay"}
        # a lone semantic/camera_info subscriber asks for inference only once the camera publishes a camera_info
        # (before: every frame was segmented for nothing)
        from sensor_msgs.msg import CameraInfo

        sub = node.create_subscription(CameraInfo, "/oc/semantic/camera_info", lambda m: None, 10)
        deadline = time.monotonic() + 10
        while cam.info_publisher.get_subscription_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cam.info_publisher.get_subscription_count() == 1
        assert node._wanted("/oc/image_raw") == set()
        cam.info_cache.add(CameraInfo(width=96, height=64))
        assert node._wanted("/oc/image_raw") == {"camera_info"}
        node.destroy_subscription(sub)


def test_outputs_changed_while_diagnostics_are_published(checkpoint: Path):
    """/diagnostics (timer thread) iterated a camera's publishers while `outputs` set live (parameter thread) added
    and removed them: 'dictionary changed size during iteration' escaped the timer callback and the node process
    ended with status 1 (once in 11868 changes at diagnostics_period 0.001). The interleaving is forced here: the
    camera's publisher dict pauses the report's iteration after its first key until the `outputs` change (run on
    this thread meanwhile) has returned or is seen waiting for the node's publisher lock; once removing publishers,
    once adding them. The report must complete, the change must have waited for it, and both must take effect."""
    from rclpy.parameter import Parameter

    with _diagnostics_node(checkpoint) as (node, _, _):
        (cam,) = node.cameras
        every = ["label", "color", "overlay", "confidence"]
        assert set(cam.publishers) == set(every)
        lock = _WatchedLock(node._pub_lock)
        node._pub_lock = lock
        for outputs in (["label"], every):
            lock.contended.clear()
            paused, changed = threading.Event(), threading.Event()
            errors: list[BaseException] = []

            class PausingDict(dict):
                """Pauses the reporter thread's iteration after the first key (other threads iterate freely)."""

                def __iter__(self):
                    keys = super().__iter__()
                    if threading.current_thread() is not reporter:
                        yield from keys
                        return
                    yield next(keys)
                    paused.set()
                    deadline = time.monotonic() + 10
                    while not (changed.is_set() or lock.contended.is_set()) and time.monotonic() < deadline:
                        time.sleep(0.001)
                    yield from keys

            def report() -> None:
                try:
                    node._publish_diagnostics()
                except BaseException as e:  # noqa: BLE001 - what escaped the timer callback
                    errors.append(e)

            reporter = threading.Thread(target=report)
            cam.publishers = PausingDict(cam.publishers)
            reporter.start()
            try:
                assert paused.wait(10), "the report did not iterate the camera's publishers"
                assert node.set_parameters([Parameter("outputs", value=outputs)])[0].successful
            finally:
                changed.set()
                reporter.join(10)
            assert not errors, repr(errors[0])
            assert lock.contended.is_set(), "the outputs change did not wait for the report"
            assert set(cam.publishers) == set(outputs)


class _WatchedLock:
    """A lock (the node's ``_pub_lock``) that records, in ``contended``, a thread that had to wait for it."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.contended = threading.Event()

    def __enter__(self) -> "_WatchedLock":
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


def test_a_camera_info_no_calibration_needs_is_dropped(checkpoint: Path, capfd):
    """A camera_info with a million distortion coefficients (8 MB) was kept, up to 1024 of them per camera (1388 MB
    after 128), and copied for every frame's output (94 ms a frame). Refused with one throttled warning."""
    from sensor_msgs.msg import CameraInfo

    with _diagnostics_node(checkpoint) as (node, _, _):
        (cam,) = node.cameras
        for i, fields in enumerate(({"d": [0.0] * 1_000_000}, {"distortion_model": "x" * 100})):
            big = CameraInfo(width=96, height=64, **fields)
            big.header.stamp.sec = 5 + i
            node._on_camera_info(cam, big)
        assert len(cam.info_cache) == 0
        ok = CameraInfo(width=96, height=64, distortion_model="rational_polynomial", d=[0.1] * 8)
        ok.header.stamp.sec = 7
        node._on_camera_info(cam, ok)
        assert len(cam.info_cache) == 1
    err = capfd.readouterr().err
    assert "/dg/image_raw: camera_info dropped: 1000000 distortion coefficients (D), more than any distortion " \
        "model has (14)" in err, err


@contextlib.contextmanager
def _diagnostics_node(checkpoint: Path, *overrides):
    """An in-process node (configured, active) whose /diagnostics reports are kept in a list instead of sent:
    yields (node, camera_status(), wait_counts(counter or drop reason, n)); destroyed after the block."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    params = [Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
              Parameter("image_topics", value=["/dg/image_raw"]), *overrides]
    with _in_process_node(params) as node:
        reports: list = []

        def camera_status():
            node._publish_diagnostics()
            return next(st for st in reports[-1].status if st.name.endswith("/dg/image_raw"))

        def wait_counts(what: str, n: int) -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                cam = node.pipeline.snapshot()["cameras"]["/dg/image_raw"]
                if (cam[what] if what in cam else cam["dropped"].get(what, 0)) >= n:  # a counter or a drop reason
                    return
                time.sleep(0.02)
            raise AssertionError(f"{what} < {n}: {node.pipeline.snapshot()['cameras']}")
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        node._diag_pub.publish = reports.append
        node.pipeline._wanted = lambda key: {"label"}  # as if the label had a subscriber (no DDS here)
        yield node, camera_status, wait_counts


def test_diagnostics_warn_after_bad_frames_then_recover(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """A camera that dropped a bad frame is WARN on /diagnostics for BAD_FRAMES_WARN_S after it, then OK again with
    the count kept in its values (before: WARN for the rest of the node's life after one bad frame)."""
    from diagnostic_msgs.msg import DiagnosticStatus

    import icnet_ros.node as node_module

    monkeypatch.setattr(node_module, "BAD_FRAMES_WARN_S", 0.5)
    with _diagnostics_node(checkpoint) as (node, camera_status, wait_counts):
        stamp = node.get_clock().now().to_msg()  # the node's own clock (another one is a standing WARN)
        bad = image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8", stamp)
        bad.encoding = "yuv422"
        good = image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8", stamp)
        node.pipeline.submit("/dg/image_raw", bad)
        wait_counts("encoding", 1)
        node.pipeline.submit("/dg/image_raw", good)
        wait_counts("processed", 1)
        st = camera_status()
        assert st.level == DiagnosticStatus.WARN and "bad frames dropped" in st.message, st.message
        time.sleep(0.7)
        node.pipeline.submit("/dg/image_raw", good)  # a good frame: the camera is fine now
        wait_counts("processed", 2)
        st = camera_status()
        assert st.level == DiagnosticStatus.OK, st.message
        assert {kv.key: kv.value for kv in st.values}["dropped_encoding"] == "1"


def test_diagnostics_warn_when_every_frame_is_too_old(checkpoint: Path):
    """A camera whose frames all arrive older than max_age gets no output at all: WARN with the reason (it was OK,
    0.0 fps, the drops only in the values and a throttled log line), and OK again once frames are served."""
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.parameter import Parameter

    with _diagnostics_node(
        checkpoint, Parameter("max_age", value=0.3), Parameter("max_age_from", value="stamp")) as (node, camera_status, wait_counts):
        now = node.get_clock().now().nanoseconds
        old = Time(sec=(now - 1_000_000_000) // 10**9, nanosec=(now - 1_000_000_000) % 10**9)  # 1 s old
        for i in range(3):
            node.pipeline.submit("/dg/image_raw", image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8", old))
            wait_counts("too_old", i + 1)
        st = camera_status()
        assert st.level == DiagnosticStatus.WARN, st.message
        assert "3 of the 3 frames handled since the last report older than max_age (0.3 s from stamp)" in st.message, \
            st.message
        node.pipeline.submit("/dg/image_raw", image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8",
                                                        node.get_clock().now().to_msg()))
        wait_counts("processed", 1)
        st = camera_status()
        assert st.level == DiagnosticStatus.OK, st.message
        assert {kv.key: kv.value for kv in st.values}["dropped_too_old"] == "3"


def test_diagnostics_of_a_deactivated_node_are_not_stale_input(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """Deactivated, the node unsubscribes on purpose: its cameras are OK, 'inactive', not WARN 'no frames for N s'
    (a lifecycle manager's deactivate raised a warning on every camera)."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.lifecycle import TransitionCallbackReturn

    import icnet_ros.node as node_module

    monkeypatch.setattr(node_module, "STALE_INPUT_S", 0.2)
    with _diagnostics_node(checkpoint) as (node, camera_status, wait_counts):
        node.pipeline.submit("/dg/image_raw", image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8",
                                                        node.get_clock().now().to_msg()))
        wait_counts("processed", 1)
        assert camera_status().level == DiagnosticStatus.OK
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        time.sleep(0.4)
        st = camera_status()
        assert st.level == DiagnosticStatus.OK and st.message == "inactive (not subscribed)", st.message
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert camera_status().level == DiagnosticStatus.WARN  # active again and silent for 0.4 s: stale


class _SubscribedPublisher:
    """A camera_info publisher with a subscriber: what it publishes is kept in ``sent``."""

    def __init__(self) -> None:
        self.sent: list = []

    def get_subscription_count(self) -> int:
        return 1

    def publish(self, msg: Any) -> None:
        self.sent.append(msg)


def test_compressed_camera_info_is_scaled_from_the_frame_not_the_live_output_size(checkpoint: Path):
    """A compressed camera's camera_info is scaled from the JPEG's own size to the label's. It took the label's
    size as the frame's whenever output_size was 'input' now: a frame segmented at output_size 'model' and
    published after a live change to 'input' got an unscaled camera_info (K for 64x96 on a 32x48 label)."""
    import cv2
    from sensor_msgs.msg import CameraInfo, CompressedImage

    from icnet_ros.engine import SegmentResult

    with _diagnostics_node(checkpoint) as (node, _, _):
        assert node.config.engine.output_size == "input"
        topic = "/dg/image_raw"
        cam = node._by_topic[topic]
        info_publisher = _SubscribedPublisher()
        sent = info_publisher.sent
        cam.compressed, cam.info_publisher = True, info_publisher
        stamp = node.get_clock().now().to_msg()
        cam.info_cache.add(CameraInfo(width=96, height=64, k=[80.0, 0, 48, 0, 80.0, 32, 0, 0, 1]))
        msg = CompressedImage(format="jpeg", data=cv2.imencode(".jpg", np.zeros((64, 96, 3), np.uint8))[1].tobytes())
        msg.header.stamp = stamp
        res = SegmentResult(label=np.zeros((32, 48), np.uint8), frame_size=(64, 96))  # output_size 'model'
        node._publish(topic, msg, "RGB", res, {"camera_info"})
        assert len(sent) == 1 and (sent[0].width, sent[0].height) == (48, 32), sent
        assert sent[0].k[0] == pytest.approx(40.0)


def test_camera_info_stamped_apart_from_the_frames_is_said_in_the_log_and_diagnostics(checkpoint: Path, capfd):
    """A driver or relay that stamps camera_info 1 ms after its image: the node published no camera_info at all,
    with no warning and /diagnostics OK. Now one throttled warning with the gap, and the camera is WARN while its
    frames find no camera_info; a matching one makes it OK again."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from sensor_msgs.msg import CameraInfo

    from icnet_ros.engine import SegmentResult

    with _diagnostics_node(checkpoint) as (node, camera_status, wait_counts):
        topic = "/dg/image_raw"
        cam = node._by_topic[topic]
        node.pipeline.submit(topic, image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8"))  # the camera publishes
        wait_counts("processed", 1)
        assert camera_status().level == DiagnosticStatus.OK
        info_publisher = _SubscribedPublisher()
        sent = info_publisher.sent
        cam.info_publisher = info_publisher
        res = SegmentResult(label=np.zeros((64, 96), np.uint8), frame_size=(64, 96))
        for i in range(cam.info_cache.pending + 3):
            info = CameraInfo(width=96, height=64, k=[80.0, 0, 48, 0, 80.0, 32, 0, 0, 1])
            info.header.stamp.sec, info.header.stamp.nanosec = 7, i * 10_000_000 + 1_000_000
            node._on_camera_info(cam, info)
            msg = image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8")
            msg.header.stamp.sec, msg.header.stamp.nanosec = 7, i * 10_000_000
            node._publish(topic, msg, "RGB", res, {"camera_info"})
        assert sent == [] and cam.info_cache.unmatched == 3
        st = camera_status()
        assert st.level == DiagnosticStatus.WARN and "camera_info stamps do not match the frames'" in st.message, st
        assert {kv.key: kv.value for kv in st.values}["camera_info_unmatched"] == "3"
        info.header.stamp.nanosec = msg.header.stamp.nanosec  # the driver fixed: stamped as its image
        node._on_camera_info(cam, info)
        assert len(sent) == 1 and sent[0].header.stamp == msg.header.stamp  # the waiting frame's, published late
        assert camera_status().level == DiagnosticStatus.OK
    err = capfd.readouterr().err
    assert err.count("frame(s) so far found no camera_info with their header stamp") == 1, err  # throttled
    assert ("/dg/image_raw: 1 frame(s) so far found no camera_info with their header stamp (the nearest camera_info "
            "is stamped 1.000 ms after the frame): no semantic/camera_info is published for them") in err, err


def test_a_publisher_of_another_message_type_is_named_not_blamed_on_qos(ros: RosHarness, checkpoint: Path, capfd):
    """A CompressedImage publisher on a raw Image topic: the node counted it as a publisher of frames, switched its
    subscription to the publisher's reliability, and warned of incompatible QoS or another DDS configuration. Now
    it is left out of the reliability choice and the warning names the type and the fix, at once."""
    from sensor_msgs.msg import CompressedImage

    with _diagnostics_node(checkpoint) as (node, _, _):
        (cam,) = node.cameras
        assert cam.reliability == "best_effort"
        pub = ros.publisher(CompressedImage, "/dg/image_raw")  # reliable, from another participant
        try:
            deadline = time.monotonic() + 10
            while not node.get_publishers_info_by_topic("/dg/image_raw") and time.monotonic() < deadline:
                time.sleep(0.05)
            node._watch_cameras()
            node._watch_cameras()
            assert cam.reliability == "best_effort" and cam.warned_no_frames
        finally:
            ros.node.destroy_publisher(pub)
    err = capfd.readouterr().err
    assert err.count("/dg/image_raw: published as") == 1 and "Likely cause" not in err, err
    assert ("/dg/image_raw: published as sensor_msgs/msg/CompressedImage, but this node subscribes to it as "
            "sensor_msgs/msg/Image: no frame can arrive (a topic that does not end in /compressed takes "
            "sensor_msgs/msg/Image; for CompressedImage frames name the camera's .../compressed topic in "
            "image_topics)") in err, err


def test_cleanup_during_a_forward_pass_longer_than_its_wait_leaves_the_model_to_the_worker(checkpoint: Path):
    """Cleanup waits a bounded time for the forward pass in flight; when that runs out, the model was closed under
    the running pass and its frames were published by a node already unconfigured. Now the worker closes the model
    when the pass ends, and its frames are counted as deactivated, not published."""
    import threading

    with _diagnostics_node(checkpoint) as (node, _, _):
        pipeline, real = node.pipeline, node.segmenter
        entered, gate, closed, published = threading.Event(), threading.Event(), [], []

        class Slow:  # the real Segmenter behind a gate; close() recorded
            def __getattr__(self, name):
                return getattr(real, name)

            def segment(self, *args, **kwargs):
                entered.set()
                gate.wait(30)
                return real.segment(*args, **kwargs)

            def close(self):
                closed.append(self)
        slow = Slow()
        node.segmenter = slow
        pipeline.swap_segmenter(slow)
        pipeline._publish = lambda *args: published.append(args) or ["label"]
        pipeline.submit("/dg/image_raw", image_msg(np.zeros((64, 96, 3), np.uint8), "rgb8"))
        assert entered.wait(30)
        node._release(timeout=0.1)  # what cleanup does, with a wait the pass outlasts
        assert node.segmenter is None and closed == []  # not closed under the running pass
        gate.set()
        deadline = time.monotonic() + 30
        while not closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert closed == [slow] and published == []
        assert pipeline.snapshot()["cameras"]["/dg/image_raw"]["dropped"] == {"deactivated": 1}


def test_diagnostics_of_an_unconfigured_node_say_why(checkpoint: Path, tmp_path: Path):
    """Under a lifecycle manager (autostart false) a node that is waiting, or whose configure failed, reports its
    state on /diagnostics (it published nothing until configured: a failed configure was only in the log)."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    missing = tmp_path / "missing.safetensors"
    overrides = [
        Parameter("model", value=str(missing)), Parameter("device", value="cpu"),
        Parameter("image_topics", value=["/dg/image_raw"])]
    with _in_process_node(overrides) as node:
        reports: list = []
        node._diag_pub.publish = reports.append

        def segmenter_status() -> DiagnosticStatus:
            node._publish_diagnostics()
            (st,) = [st for st in reports[-1].status if st.name.endswith(": segmenter")]
            return st
        st = segmenter_status()
        assert (st.level, st.message) == (DiagnosticStatus.OK, "unconfigured: waiting for configure")
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        st = segmenter_status()
        assert st.level == DiagnosticStatus.ERROR and st.message.startswith("unconfigured: configure failed: "), st
        assert str(missing) in st.message and len(reports[-1].status) == 1
        assert node.set_parameters([Parameter("model", value=str(checkpoint))])[0].successful
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        st = segmenter_status()
        assert st.level == DiagnosticStatus.OK and st.message.startswith("inactive; "), st.message

        def no_subscription(cam):
            raise RuntimeError("no subscription")
        node._subscribe = no_subscription
        assert node.trigger_activate() == TransitionCallbackReturn.FAILURE
        st = segmenter_status()
        assert st.level == DiagnosticStatus.ERROR, st.message
        assert st.message.endswith("activate failed: cannot subscribe to the cameras: RuntimeError: no subscription")
        assert node.trigger_shutdown() == TransitionCallbackReturn.SUCCESS
        count = len(reports)
        node._publish_diagnostics()  # shut down, the process ending: nothing (it said 'waiting for configure')
        assert len(reports) == count and node.finished.wait(5)


def test_string_parameters_take_numbers_and_bools_as_text(checkpoint: Path):
    """`-p input_size:=1.5`, `-p warmup:=false` and `ros2 param set ... input_size 2` type their values as double,
    bool and integer: the string parameters take their text instead of refusing the type."""
    from rclpy.parameter import Parameter

    overrides = [
        Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
        Parameter("input_size", value=1.5), Parameter("warmup", value=False), Parameter("max_age", value=2),
        Parameter("max_batch", value=3.0)]
    with _in_process_node(overrides) as node:
        assert node.get_parameter("input_size").value == "1.5" and node.get_parameter("warmup").value == "false"
        assert node.get_parameter("max_age").value == 2.0 and node.get_parameter("max_batch").value == 3  # `-p max_age:=2`
        assert node.config.engine.input_size == 1.5 and node.config.engine.warmup is False
        assert node.set_parameters([Parameter("input_size", value=2)])[0].successful  # unconfigured: recorded
        assert node.get_parameter("input_size").value == "2" and node.config.engine.input_size == 2.0
        result = node.set_parameters([Parameter("input_size", value=9.0)])[0]
        assert not result.successful and "scale 9.0 must be in [1/64, 4]" in result.reason, result
        # `ros2 param set ... max_age 0` sends an integer, `max_batch 2.0` a double: taken in the declared type
        # (rclpy refused them with "Wrong parameter type, expected '3' got '2'")
        for name, value, expected in (("max_age", 0, 0.0), ("overlay_alpha", 1, 1.0), ("max_batch", 2.0, 2)):
            assert node.set_parameters([Parameter(name, value=value)])[0].successful, name
            got = node.get_parameter(name).value
            assert got == expected and type(got) is type(expected), (name, got)
        assert not node.set_parameters([Parameter("max_batch", value=2.5)])[0].successful


def test_warmup_at_the_cameras_sizes_and_its_hot_swap(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """``warmup``: the node warms its Segmenter at the cameras' frame sizes and at every batch its cameras can form
    (CUDA graphs and compiled graphs are made there, before the first frame), says so in its ready line, and a new
    value is a hot swap; a bad one is refused with the reason and the running Segmenter keeps serving."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    overrides = [
        Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
        Parameter("image_topics", value=["/wu/image_raw", "/wu2/image_raw", "/wu3/image_raw"]),
        Parameter("max_batch", value=2), Parameter("warmup", value="96x128;120x160")]
    with _in_process_node(overrides) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        seg = node.segmenter
        # three cameras, batches of at most 2: each size at batch 1 (the Segmenter), then at batch 2 (the node)
        assert seg.warmed_up == [(96, 128, 1), (120, 160, 1), (96, 128, 2), (120, 160, 2)]
        assert "warmed up at 96x128, 120x160 (batches 1-2)" in node._describe_model()
        result = node.set_parameters([Parameter("warmup", value="64x")])[0]
        assert not result.successful and "must be true, false or frame sizes" in result.reason, result
        result = node.set_parameters([Parameter("warmup", value="96x128;40000x40000")])[0]  # bounded as frames are
        assert not result.successful and "warmup size 40000x40000 is larger than max_pixels" in result.reason, result
        result = node.set_parameters([Parameter("max_pixels", value=5000)])[0]  # the other side of the same bound
        assert not result.successful and "warmup size 96x128 is larger than max_pixels (5000)" in result.reason
        assert node.segmenter is seg and node.config.max_pixels > 5000
        result = node.set_parameters([Parameter("input_size", value="0.25")])[0]  # live, but not for these cameras
        assert not result.successful and "the warm-up size 96x128 (warmup): 96x128 gives a 24x32 network input" \
            in result.reason, result
        assert node.config.engine.input_size == seg.config.input_size == "auto"
        # max_batch raised live: batches of 3 are warmed up now, not on the hot path (before: never)
        assert node.set_parameters([Parameter("max_batch", value=3)])[0].successful and node.segmenter is seg
        assert seg.warmed_up[4:] == [(96, 128, 3), (120, 160, 3)]
        assert node.set_parameters([Parameter("max_batch", value=1)])[0].successful and len(seg.warmed_up) == 6
        # a warm-up that fails (out of memory, simulated: no GPU here) refuses the whole atomic change, the live
        # input_size applied before it included (it stayed, while the node reported the change refused)
        def out_of_memory(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        monkeypatch.setattr(seg, "warmup", out_of_memory)
        result = node.set_parameters_atomically([Parameter("input_size", value="0.75"),
                                                 Parameter("max_batch", value=3)])
        assert not result.successful and "out of memory (simulated)" in result.reason, result
        assert seg.config.input_size == node.config.engine.input_size == "auto" and node.config.max_batch == 1
        monkeypatch.undo()
        assert node.set_parameters([Parameter("warmup", value="false")])[0].successful
        assert node.segmenter is not seg and node.segmenter.warmed_up == []  # a new Segmenter, not warmed up
        assert "no warm-up" in node._describe_model()


def test_run_time_changes_that_change_nothing_reload_nothing(checkpoint: Path, tmp_path: Path, monkeypatch,
                                                             capfd):
    """Setting parameters to the values they have (`ros2 param load` of the file the node runs with) reloads no
    model; the same model path reloads only when its file was rewritten; `~` works at run time as at start-up;
    an atomic max_pixels + warmup change is checked against the new max_pixels; a refused hot swap says so in the
    node's log, not only to the caller."""
    import shutil

    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    monkeypatch.setenv("HOME", str(tmp_path))
    model = tmp_path / "m.safetensors"
    shutil.copy(checkpoint, model)
    overrides = [
        Parameter("model", value=str(model)), Parameter("device", value="cpu"), Parameter("warmup", value="96x128"),
        Parameter("image_topics", value=["/nc/image_raw"])]
    with _in_process_node(overrides) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        seg = node.segmenter
        current = [p for p in node.get_parameters(list(node._parameters)) if not node.describe_parameter(
            p.name).read_only]
        assert all(r.successful for r in node.set_parameters(current))  # every parameter, one by one: no reload
        assert node.set_parameters_atomically(current).successful
        assert node.segmenter is seg, "a parameter set to its own value reloaded the model"
        os.utime(model, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file rewritten: the same path reloads
        assert node.set_parameters([Parameter("model", value=str(model))])[0].successful
        assert node.segmenter is not seg
        seg = node.segmenter
        assert node.set_parameters([Parameter("model", value="~/m.safetensors")])[0].successful  # ~ as at start-up
        assert node.segmenter is not seg and node.model_path == "~/m.safetensors"
        assert node.set_parameters([Parameter("max_pixels", value=100_000)])[0].successful
        result = node.set_parameters_atomically([Parameter("max_pixels", value=400_000),
                                                 Parameter("warmup", value="480x640")])  # 307200 <= 400000
        assert result.successful, result.reason
        assert node.config.max_pixels == 400_000 and node.segmenter.warmed_up == [(480, 640, 1)]
        result = node.set_parameters([Parameter("model", value=str(tmp_path / "missing.safetensors"))])[0]
        assert not result.successful and result.reason.endswith("missing.safetensors': no such file"), result
        capfd.readouterr()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a model")
        result = node.set_parameters([Parameter("model", value=str(bad))])[0]
        assert not result.successful and "cannot load model" in result.reason, result
        err = capfd.readouterr().err
        assert "hot swap refused: cannot load model" in err and "still serving ~/m.safetensors" in err, err


def test_a_model_file_replaced_while_it_loads_is_loaded_again_when_asked(checkpoint: Path, tmp_path: Path,
                                                                          monkeypatch):
    """The loaded file's identity was taken after the load (and warm-up, compile or engine build): a file replaced
    meanwhile was recorded as loaded, and setting `model` to the same path then changed nothing, the old weights
    kept serving. The identity is taken before the file is read."""
    import shutil

    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from icnet_ros import engine

    model = tmp_path / "m.safetensors"
    shutil.copy(checkpoint, model)
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)

    class ReplacedWhileLoading(engine.Segmenter):  # another process writes the file during the load
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not replaced:
                replaced.append(os.replace(other, model))

    replaced: list = []
    monkeypatch.setattr(engine, "Segmenter", ReplacedWhileLoading)
    overrides = [
        Parameter("model", value=str(model)), Parameter("device", value="cpu"), Parameter("warmup", value="false"),
        Parameter("image_topics", value=["/rl/image_raw"])]
    with _in_process_node(overrides) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS and replaced
        seg = node.segmenter
        assert node.set_parameters([Parameter("model", value=str(model))])[0].successful
        assert node.segmenter is not seg, "the replaced file was taken as the one loaded"
        seg = node.segmenter
        assert node.set_parameters([Parameter("model", value=str(model))])[0].successful
        assert node.segmenter is seg  # now it is the one loaded


def test_a_missing_default_model_fails_configure_with_the_reason(monkeypatch, capfd):
    """model '' with no default model installed: configure fails with the reason in the log (the exception was
    swallowed by rclpy's lifecycle and nothing said why), and the node can be configured once a model is set."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    monkeypatch.setenv("ICNET_ROS_DEFAULT_MODEL", "/nonexistent/road.safetensors")
    overrides = [
        Parameter("device", value="cpu"), Parameter("warmup", value="false")]
    with _in_process_node(overrides) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        reason = ("cannot load model: the default model is not installed: "
                  "ICNET_ROS_DEFAULT_MODEL=/nonexistent/road.safetensors is not a file; set the 'model' parameter")
        assert node.startup_error.startswith(reason), node.startup_error
        assert f"configure failed: {reason}" in capfd.readouterr().err
