"""icnet_node end to end, with real rclpy and Fast DDS on loopback and a small real checkpoint.

One node process (started from config/icnet.yaml) serves two cameras for the whole module: /cam_a/image_raw (raw
images) and /cam_b/image_raw/compressed (CompressedImage). The tests publish frames from this process and check
what comes back over the topics. Start-up failures run short-lived node processes of their own.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import ros_support
from helpers import make_checkpoint
from ros_support import Process, RosHarness, diagnostics_values, image_msg, ros  # noqa: F401 - fixture

ros_support.require_rclpy()

from builtin_interfaces.msg import Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import GetParameters, SetParameters  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from icnet_ros import node as node_module  # noqa: E402
from icnet_ros import node_params  # noqa: E402
from icnet_ros.classes import CAMVID  # noqa: E402
from icnet_ros.ros_image import image_to_numpy, numpy_to_compressed  # noqa: E402

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "config" / "icnet.yaml"
CAM_A, CAM_B = "/cam_a/image_raw", "/cam_b/image_raw/compressed"
KINDS = ("label", "color", "overlay", "confidence")
H, W = 120, 160
WAIT = 20.0  # seconds for one frame's outputs (generous: the CI machine is shared)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("icnet_node") / "tiny.safetensors")


#: icnet_node (node_process.main) with each Segmenter.segment call of the inference thread recorded, the outputs it
#: asks for, as one JSON line in the file ICNET_TEST_SEGMENT_CALLS names (what the node computes, not publishes)
RECORDING_NODE = """
import json
import os
import sys
import threading

from icnet_ros import engine, node_process

real = engine.Segmenter.segment


def segment(self, frames, channel_order="RGB", outputs=None):
    if threading.current_thread().name == "icnet_inference":
        with open(os.environ["ICNET_TEST_SEGMENT_CALLS"], "a") as f:
            f.write(json.dumps({"frames": len(frames), "outputs": None if outputs is None else sorted(outputs)})
                    + "\\n")
    return real(self, frames, channel_order, outputs)


engine.Segmenter.segment = segment
sys.exit(node_process.main())
"""


@pytest.fixture(scope="module")
def node_proc(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The module's node process (RECORDING_NODE: the real node, its Segmenter calls recorded)."""
    wrapper = tmp_path_factory.mktemp("icnet_node_wrapper")
    (wrapper / "recording_icnet_node.py").write_text(RECORDING_NODE)
    calls = wrapper / "segment_calls.jsonl"
    calls.touch()
    env = ros_support.subprocess_env(ICNET_TEST_SEGMENT_CALLS=str(calls), PYTHONPATH=os.pathsep.join(
        p for p in (str(wrapper), os.environ.get("PYTHONPATH")) if p))
    proc = Process("recording_icnet_node", ["--ros-args", "--params-file", str(PARAMS_FILE), "-p",
                                            f"model:={checkpoint}", "-p", "device:=cpu",
                                            "-p", f"image_topics:=[{CAM_A},{CAM_B}]", "-p", "max_age:=5.0"],
                   tmp_path_factory.mktemp("icnet_node_log"), name="icnet_node", env=env)
    proc.segment_calls = calls  # type: ignore[attr-defined]
    try:
        proc.wait_for_output("ready:", 120)
        yield proc
    finally:
        proc.kill()


def frame(seed: int, channels: int = 3) -> np.ndarray:
    """A frame with large flat regions (so the random network gives several classes) plus noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 2] = rng.integers(0, 256, 3)
    img[H // 2:, : W // 2] = rng.integers(0, 256, 3)
    img[H // 2:, W // 2:] = rng.integers(0, 256, 3)
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    if channels == 1:
        return img[:, :, 1].copy()
    if channels == 4:
        return np.concatenate([img, np.full((H, W, 1), 200, np.uint8)], axis=2)
    return img


class Outputs:
    """Subscriptions to every output of one camera; ``wait(stamp)`` returns the messages with that stamp."""

    def __init__(self, ros: RosHarness, camera_ns: str, kinds: tuple[str, ...] = KINDS, info: bool = True) -> None:
        self.ros = ros
        self.cols = {k: ros.collect(Image, f"{camera_ns}/semantic/{k}") for k in kinds}
        if info:
            self.cols["camera_info"] = ros.collect(CameraInfo, f"{camera_ns}/semantic/camera_info")
        for col in self.cols.values():
            ros.wait_matched(col.subscription)

    def wait(self, stamp: Time, timeout: float = WAIT) -> dict[str, Any] | None:
        def same(m: Any) -> bool:
            return m.header.stamp.sec == stamp.sec and m.header.stamp.nanosec == stamp.nanosec

        for col in self.cols.values():
            if not col.wait_for(lambda msgs: any(same(m) for m in msgs), timeout):
                return None
        return {k: col.find(same)[0] for k, col in self.cols.items()}

    def close(self) -> None:
        for col in self.cols.values():
            self.ros.unsubscribe(col)


def send_until_served(ros: RosHarness, publish: Any, outputs: Outputs, attempts: int = 3) -> tuple[Time, dict]:
    """Publish (a fresh stamp each time) until the node's outputs for it arrive: the input is best effort and the
    node only computes outputs it knows to be subscribed, so the first frame after a (re)subscription may be lost
    to discovery."""
    for _ in range(attempts):
        stamp = ros.now().to_msg()
        publish(stamp)
        got = outputs.wait(stamp, timeout=WAIT / attempts)
        if got is not None:
            return stamp, got
    pytest.fail(f"no outputs after {attempts} frames")


def send_with_camera_info(ros: RosHarness, pub: Any, info_pub: Any, img: np.ndarray, frame_id: str,
                          received: Any, attempts: int = 5) -> None:
    """Publish ``img`` (rgb8) with its camera_info (one stamp; K and P of a 160x120 camera) until
    ``received(timeout)`` says its outputs came: the input is best effort, so a frame may be lost to discovery."""
    for _ in range(attempts):
        stamp = ros.now().to_msg()
        cam_info = CameraInfo(width=W, height=H, k=[100.0, 0, 80.0, 0, 100.0, 60.0, 0, 0, 1.0],
                              p=[100.0, 0, 80.0, 0, 0, 100.0, 60.0, 0, 0, 0, 1.0, 0])
        cam_info.header.stamp = stamp
        info_pub.publish(cam_info)
        pub.publish(image_msg(img, "rgb8", stamp, frame_id=frame_id))
        if received(4):
            return


def node_diagnostics(ros: RosHarness, suffix: str, after: float | None = None, timeout: float = 10.0) -> dict:
    """The newest /diagnostics values of the node's status ending in ``suffix`` (received after ``after``)."""
    col = ros._diag  # type: ignore[attr-defined]
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        with col._cond:
            msgs = [m for (t, m) in col.messages if after is None or t > after]
        values = diagnostics_values(msgs, suffix)
        if values is not None:
            return values
        time.sleep(0.1)
    pytest.fail(f"no /diagnostics status ending in {suffix!r}")


@pytest.fixture(scope="module")
def harness(ros: RosHarness, node_proc: Process) -> RosHarness:
    """The test node, with a /diagnostics recorder (each message kept with its arrival time)."""
    col = ros_support.Collector()
    ros._diag = col  # type: ignore[attr-defined]
    col.subscription = ros.node.create_subscription(DiagnosticArray, "/diagnostics",
                                                    lambda m: col((time.monotonic(), m)), 10)
    return ros


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Any:
    """A Segmenter in this process with the node's engine configuration (the params file's defaults, device cpu;
    test_params_file_carries_the_declared_defaults checks that the file holds them)."""
    from icnet_ros.engine import Segmenter

    values = {**node_params.defaults(), "model": str(checkpoint), "device": "cpu"}  # = the params file's
    seg = Segmenter(str(checkpoint), node_params.parse(values).engine.replace(warmup=False))
    yield seg
    seg.close()


def reference_outputs(seg: Any, img: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, confidence, clear) for ``img`` by the torch definition, from the logits of ``seg``'s network for the
    frame the node makes of the message: bilinear upsampling (align_corners=False), argmax, round(255 * max softmax
    probability); ``clear``: pixels whose two best classes are not within float rounding of each other."""
    import torch
    import torch.nn.functional as F

    from icnet_ros.ros_image import segmenter_input

    frame_, order = segmenter_input(image_msg(img, encoding))
    logits: list = []
    labels = seg.labels

    def keep_logits(x: Any, out_size: tuple[int, int], want_confidence: bool) -> Any:
        logits.append(x.detach().float().clone())
        return labels(x, out_size, want_confidence)

    seg.labels = keep_logits
    try:
        seg.segment([frame_], channel_order=order, outputs=("label",))
    finally:
        del seg.labels
    (x,) = logits
    up = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)[0]
    ranked = up.sort(0, descending=True).values
    conf = torch.round(up.softmax(0).max(0).values * 255.0)
    return up.argmax(0).numpy(), conf.numpy().astype(int), (ranked[0] - ranked[1] > 1e-4).numpy()


def set_node_parameter(ros: RosHarness, name: str, value: float) -> None:
    client = ros.node.create_client(SetParameters, "/icnet_node/set_parameters")
    assert client.wait_for_service(timeout_sec=10)
    req = SetParameters.Request(parameters=[ParameterMsg(name=name, value=ParameterValue(
        type=ParameterType.PARAMETER_DOUBLE, double_value=float(value)))])
    res = client.call(req, timeout_sec=10)
    ros.node.destroy_client(client)
    assert res is not None and res.results[0].successful, res


# ---------------------------------------------------------------------------------------------- static
def test_params_file_carries_the_declared_defaults():
    doc = yaml.safe_load(PARAMS_FILE.read_text())
    params = doc["/**"]["ros__parameters"]
    flat: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    assert flat == node_params.defaults()
    node_params.parse(flat)  # and they validate
    # and the file is exactly what node_params renders (descriptions and allowed values included)
    assert PARAMS_FILE.read_text() == node_params.render_params_file()


# ---------------------------------------------------------------------------------------------- serving
@pytest.mark.parametrize("encoding,channels,pad", [("rgb8", 3, 0), ("bgr8", 3, 8), ("rgba8", 4, 0),
                                                   ("bgra8", 4, 4), ("mono8", 1, 3)])
def test_every_output_for_every_encoding(harness: RosHarness, reference: Any, encoding: str, channels: int,
                                        pad: int):
    """Every output and the camera_info for a frame of each encoding (padded rows too): header, encoding and size;
    the colour mask is the palette of the label, the overlay the blend, and the label and confidence are what the
    node's model gives for this frame (argmax and max softmax probability of its logits, computed here)."""
    ros = harness
    pub = ros.publisher(Image, CAM_A)
    info_pub = ros.publisher(CameraInfo, "/cam_a/camera_info")
    outputs = Outputs(ros, "/cam_a")
    img = frame(channels, channels)
    try:
        ros.wait_matched(pub)

        def publish(stamp: Time) -> None:
            info = CameraInfo(width=W, height=H, distortion_model="plumb_bob", d=[0.1, 0.0, 0.0, 0.0, 0.0],
                              k=[100.0, 0, 80.0, 0, 100.0, 60.0, 0, 0, 1.0])
            info.header.stamp, info.header.frame_id = stamp, "cam_a_optical"
            info_pub.publish(info)
            msg = image_msg(img, encoding, stamp, frame_id="cam_a_optical")
            if pad:  # a padded row layout: step > width * channels
                rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(H, -1)
                padded = np.concatenate([rows, np.full((H, pad), 7, np.uint8)], axis=1)
                msg.step = padded.shape[1]
                msg.data = padded.tobytes()
            pub.publish(msg)

        stamp, got = send_until_served(ros, publish, outputs)
    finally:
        outputs.close()
        ros.node.destroy_publisher(pub)
        ros.node.destroy_publisher(info_pub)

    colour_enc = "bgr8" if encoding in ("bgr8", "bgra8") else "rgb8"
    expected_enc = {"label": "mono8", "confidence": "mono8", "color": colour_enc, "overlay": colour_enc}
    arrays = {}
    for kind in KINDS:
        m = got[kind]
        assert m.header.stamp == stamp and m.header.frame_id == "cam_a_optical", kind
        assert (m.encoding, m.height, m.width) == (expected_enc[kind], H, W), kind
        arrays[kind] = image_to_numpy(m)
    label = arrays["label"]
    assert label.max() < CAMVID.num_classes
    assert len(np.unique(label)) >= 2, "a real network on a structured frame predicts more than one class"
    # colour mask = the class palette, in the output's channel order
    palette = CAMVID.palette_array()
    if colour_enc == "bgr8":
        palette = palette[:, ::-1]
    np.testing.assert_array_equal(arrays["color"], palette[label])
    # overlay = 0.5 * colour + 0.5 * image (same channel order as the colour mask)
    base = img[:, :, :3] if channels > 1 else np.repeat(img[:, :, None], 3, axis=2)
    expected = 0.5 * arrays["color"].astype(float) + 0.5 * base
    assert np.abs(arrays["overlay"].astype(float) - expected).max() <= 1.0
    # confidence = max softmax probability: never below 1 / num_classes, and the same as the torch definition on
    # the same network's logits for this frame (a constant or another frame's map differs)
    conf = arrays["confidence"].astype(int)
    assert conf.min() >= int(255 / CAMVID.num_classes) - 1
    ref_label, ref_conf, clear = reference_outputs(reference, img, encoding)
    assert np.abs(conf - ref_conf).max() <= 1, f"confidence differs from the softmax by {np.abs(conf - ref_conf).max()}"
    assert len(np.unique(conf)) > 10 and conf.max() < 255, "a real confidence map varies"
    np.testing.assert_array_equal(label[clear], ref_label[clear])
    info = got["camera_info"]
    assert info.header.stamp == stamp and info.header.frame_id == "cam_a_optical"
    assert (info.width, info.height) == (W, H) and list(info.k) == [100.0, 0, 80.0, 0, 100.0, 60.0, 0, 0, 1.0]


def test_camera_info_arriving_after_its_image_is_still_published(harness: RosHarness):
    """A driver that publishes the image first (or DDS delivering the two topics out of order): the frame is served
    before its camera_info is there, and the scaled camera_info goes out when it arrives (it never did)."""
    ros = harness
    pub = ros.publisher(Image, CAM_A)
    info_pub = ros.publisher(CameraInfo, "/cam_a/camera_info")
    outputs = Outputs(ros, "/cam_a", kinds=("label",), info=False)
    infos = ros.collect(CameraInfo, "/cam_a/semantic/camera_info")
    try:
        ros.wait_matched(pub)
        ros.wait_matched(info_pub)
        ros.wait_matched(infos.subscription)
        img = frame(21)
        stamp, got = send_until_served(ros, lambda st: pub.publish(image_msg(img, "rgb8", st, frame_id="late")),
                                       outputs)
        time.sleep(0.2)
        assert not any(m.header.stamp == stamp for m in infos.messages)  # no camera_info for it yet
        info = CameraInfo(width=W, height=H, k=[100.0, 0, 80.0, 0, 100.0, 60.0, 0, 0, 1.0])
        info.header.stamp, info.header.frame_id = stamp, "late"
        info_pub.publish(info)
        assert infos.wait_for(lambda ms: any(m.header.stamp == stamp for m in ms), WAIT), "late camera_info lost"
        out = infos.find(lambda m: m.header.stamp == stamp)[0]
        assert out.header == got["label"].header and (out.width, out.height) == (W, H)
        assert list(out.k) == [100.0, 0, 80.0, 0, 100.0, 60.0, 0, 0, 1.0]
    finally:
        outputs.close()
        ros.unsubscribe(infos)
        ros.node.destroy_publisher(pub)
        ros.node.destroy_publisher(info_pub)


def test_compressed_input(harness: RosHarness):
    ros = harness
    pub = ros.publisher(CompressedImage, CAM_B)
    outputs = Outputs(ros, "/cam_b", info=False)
    img = frame(11)
    fmt, data = numpy_to_compressed(img, "RGB", "png")
    try:
        ros.wait_matched(pub)

        def publish(stamp: Time) -> None:
            msg = CompressedImage(format=fmt, data=data)
            msg.header.stamp, msg.header.frame_id = stamp, "cam_b_optical"
            pub.publish(msg)

        stamp, got = send_until_served(ros, publish, outputs)
    finally:
        outputs.close()
        ros.node.destroy_publisher(pub)
    for kind in KINDS:
        m = got[kind]
        assert m.header.stamp == stamp and m.header.frame_id == "cam_b_optical"
        assert (m.height, m.width) == (H, W)
    assert got["color"].encoding == "rgb8"  # decoded compressed images are RGB
    overlay = image_to_numpy(got["overlay"]).astype(float)
    expected = 0.5 * image_to_numpy(got["color"]) + 0.5 * img
    assert np.abs(overlay - expected).max() <= 1.0


def test_two_cameras_share_one_forward_pass(harness: RosHarness):
    ros = harness
    set_node_parameter(ros, "batch_timeout", 1.0)  # wait for the second camera's frame (a run-time change)
    pub_a, pub_b = ros.publisher(Image, CAM_A), ros.publisher(CompressedImage, CAM_B)
    out_a, out_b = Outputs(ros, "/cam_a", ("label",), info=False), Outputs(ros, "/cam_b", ("label",), info=False)
    try:
        ros.wait_matched(pub_a)
        ros.wait_matched(pub_b)
        time.sleep(0.5)  # let the node see the new subscriptions (outputs are lazy)
        # batch_timeout waits only for cameras that sent a frame recently: the first pair may go as two batches
        for attempt in range(4):  # best-effort input: a lost frame means another try with fresh counters
            before = node_diagnostics(ros, ": segmenter", after=time.monotonic())
            stamp = ros.now().to_msg()
            fmt, data = numpy_to_compressed(frame(21 + attempt), "RGB", "png")
            msg_b = CompressedImage(format=fmt, data=data)
            msg_b.header.stamp = stamp
            pub_a.publish(image_msg(frame(20), "rgb8", stamp))
            pub_b.publish(msg_b)
            if out_a.wait(stamp, WAIT / 4) is not None and out_b.wait(stamp, WAIT / 4) is not None:
                after = node_diagnostics(ros, ": segmenter", after=time.monotonic())
                if int(after["batches"]) - int(before["batches"]) == 1:
                    break
        else:
            pytest.fail("the two cameras' frames were not served in one batch")
    finally:
        out_a.close()
        out_b.close()
        ros.node.destroy_publisher(pub_a)
        ros.node.destroy_publisher(pub_b)
        set_node_parameter(ros, "batch_timeout", 0.0)
    # one Segmenter call; same-size frames in one call go through the network as one batch
    assert int(after["batches"]) - int(before["batches"]) == 1
    assert int(after["frames_processed"]) - int(before["frames_processed"]) == 2
    assert int(after["max_batch_size"]) >= 2
    assert after["device"] == "cpu" and int(after["cpu_threads"]) == node_module.auto_cpu_threads()


def segment_calls(node_proc: Process) -> list[dict]:
    """The node's Segmenter calls so far (RECORDING_NODE), oldest first."""
    return [json.loads(line) for line in node_proc.segment_calls.read_text().splitlines()]  # type: ignore[attr-defined]


def test_lazy_outputs(harness: RosHarness, node_proc: Process):
    """The node computes only the outputs someone subscribes to: with a label subscriber alone, each Segmenter call
    for the frames sent asks for the label only (recorded in the node process), and only the label is published
    (the computed_* values on /diagnostics count the outputs published)."""
    ros = harness
    pub = ros.publisher(Image, CAM_A)
    outputs = Outputs(ros, "/cam_a", ("label",), info=False)
    try:
        ros.wait_matched(pub)
        for kind in ("color", "overlay", "confidence"):  # nobody else listens to these
            ros.wait_until(lambda k=kind: ros.node.count_subscribers(f"/cam_a/semantic/{k}") == 0, 10,
                           f"no subscriber on {kind}")
        time.sleep(0.5)
        before = node_diagnostics(ros, CAM_A, after=time.monotonic())
        calls_before = len(segment_calls(node_proc))
        send_until_served(ros, lambda s: pub.publish(image_msg(frame(30), "rgb8", s)), outputs)
        after = node_diagnostics(ros, CAM_A, after=time.monotonic())
    finally:
        outputs.close()
        ros.node.destroy_publisher(pub)
    calls = segment_calls(node_proc)[calls_before:]
    assert calls, "no Segmenter call recorded for the frames sent"
    assert all(c["outputs"] == ["label"] for c in calls), f"computed more than the label: {calls}"
    assert int(after["computed_label"]) > int(before["computed_label"])
    for kind in ("color", "overlay", "confidence"):
        assert after[f"computed_{kind}"] == before[f"computed_{kind}"], f"{kind} was computed without subscribers"


def _bad(kind: str, stamp: Time) -> Image:
    msg = image_msg(frame(40), "rgb8", stamp)
    if kind == "encoding":
        msg.encoding = "yuv422"
    elif kind == "size":
        msg.height, msg.width, msg.step, msg.data = 0, 0, 0, b""
    elif kind == "step":
        msg.step = W * 3 - 1
    elif kind == "truncated":
        msg.data = bytes(msg.data)[: (H // 2) * W * 3]
    return msg


def test_bad_messages_are_dropped_and_counted(harness: RosHarness, node_proc: Process):
    ros = harness
    pub = ros.publisher(Image, CAM_A)
    outputs = Outputs(ros, "/cam_a", ("label",), info=False)  # someone listens, so frames are decoded
    try:
        ros.wait_matched(pub)
        time.sleep(0.5)
        for reason in ("encoding", "size", "step", "truncated"):
            key = f"dropped_{reason}"
            before = int(node_diagnostics(ros, CAM_A, after=time.monotonic()).get(key, 0))
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:  # re-send until counted (best-effort input)
                pub.publish(_bad(reason, ros.now().to_msg()))
                if int(node_diagnostics(ros, CAM_A, after=time.monotonic() + 0.2).get(key, 0)) > before:
                    break
            else:
                pytest.fail(f"a bad frame ({reason}) was never counted")
        # and the node keeps serving, also frames stamped by another clock (100 s behind: freshness counts from
        # receipt by default), with one warning once two in a row were
        served = 0
        for _ in range(6):
            behind = ros.now().to_msg()
            behind.sec -= 100
            pub.publish(image_msg(frame(42), "rgb8", behind))
            got = outputs.wait(behind, timeout=WAIT / 3)
            served += got is not None
            if served == 2:
                break
        else:
            pytest.fail("two frames stamped 100 s behind were not served")
        assert got["label"].header.stamp == behind  # the output header is the input's
    finally:
        outputs.close()
        ros.node.destroy_publisher(pub)
    diag = node_diagnostics(ros, CAM_A, after=time.monotonic())
    assert int(diag["frames_dropped"]) >= 4
    assert 99 < float(diag["clock_offset_s"]) < 200
    log = node_proc.output()
    assert "unsupported image encoding 'yuv422'" in log
    assert "step" in log and "truncated" in log
    assert log.count("behind this node's clock") == 1 and "use_sim_time" in log


def test_class_metadata_topic_and_parameters(harness: RosHarness):
    ros = harness
    col = ros.collect(String, "/icnet_node/classes", RosHarness.qos(depth=1, transient_local=True))
    try:
        assert col.wait_for(lambda m: len(m) >= 1, WAIT), "no class metadata (transient local) received"
    finally:
        ros.unsubscribe(col)
    doc = json.loads(col.messages[0].data)
    assert [c["name"] for c in doc["classes"]] == list(CAMVID.classes)
    assert [c["id"] for c in doc["classes"]] == list(range(CAMVID.num_classes))
    # every colour, '#rrggbb' in RGB order (CamVid's building (128, 0, 0) is '#800000'; a swap gives '#000080')
    rgb = ["#%02x%02x%02x" % c for c in CAMVID.palette]
    assert rgb[1] == "#800000"
    assert [c["color"] for c in doc["classes"]] == rgb
    assert doc["ignore_index"] == 255
    client = ros.node.create_client(GetParameters, "/icnet_node/get_parameters")
    try:
        assert client.wait_for_service(timeout_sec=10)
        res = client.call(GetParameters.Request(names=["classes.names", "classes.colors", "classes.ignore_index",
                                                       "image_topics"]), timeout_sec=10)
    finally:
        ros.node.destroy_client(client)
    names, colors, ignore, topics = res.values
    assert list(names.string_array_value) == list(CAMVID.classes)
    assert list(colors.string_array_value) == rgb
    assert ignore.integer_value == 255
    assert list(topics.string_array_value) == [CAM_A, CAM_B]
    # the classes.* parameters are the model's: read-only, a `ros2 param set` of one is refused
    client = ros.node.create_client(SetParameters, "/icnet_node/set_parameters")
    try:
        assert client.wait_for_service(timeout_sec=10)
        value = ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=rgb[::-1])
        res = client.call(SetParameters.Request(parameters=[ParameterMsg(name="classes.colors", value=value)]),
                          timeout_sec=10)
    finally:
        ros.node.destroy_client(client)
    assert not res.results[0].successful and "read-only" in res.results[0].reason, res


def test_a_parameter_dump_loads_back(harness: RosHarness, tmp_path: Path):
    """`ros2 param dump` then `ros2 param load` of the dump (the way to save and restore a tuned node): every value
    survives the parameter-file reader, and the node takes the writable ones back unchanged (no hot swap). The
    class metadata as a JSON string parameter broke the load (the reader parses string values as YAML: a dict,
    then a TypeError; ros2/rclpy#1507)."""
    from rcl_interfaces.srv import ListParameters
    from rclpy.parameter import parameter_dict_from_yaml_file, parameter_value_to_python

    ros = harness

    def call(srv_type: Any, service: str, request: Any) -> Any:
        client = ros.node.create_client(srv_type, f"/icnet_node/{service}")
        try:
            assert client.wait_for_service(timeout_sec=10)
            return client.call(request, timeout_sec=10)
        finally:
            ros.node.destroy_client(client)

    names = sorted(call(ListParameters, "list_parameters", ListParameters.Request()).result.names)
    values = [parameter_value_to_python(v) for v in
              call(GetParameters, "get_parameters", GetParameters.Request(names=names)).values]
    dump: dict[str, Any] = {}
    for name, value in zip(names, values):  # nested by the dots, as `ros2 param dump` writes it
        *groups, leaf = name.split(".")
        level = dump
        for group in groups:
            level = level.setdefault(group, {})
        level[leaf] = value
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.dump({"/icnet_node": {"ros__parameters": dump}}, default_flow_style=False))
    loaded = parameter_dict_from_yaml_file(str(path), target_nodes=["/icnet_node"])  # what `ros2 param load` reads
    assert sorted(loaded) == names
    params = list(loaded.values())
    results = call(SetParameters, "set_parameters", SetParameters.Request(parameters=params)).results
    refused = [(p.name, r.reason) for p, r in zip(params, results) if not r.successful]
    assert all("read-only" in reason for _, reason in refused), refused  # (`ros2 param load` lists those)
    taken = {p.name for p, r in zip(params, results) if r.successful}
    assert {"model", "input_size", "overlay_alpha", "warmup", "outputs"} <= taken, taken
    # (the reader turns warmup's text 'true' into a bool: the node takes it as the text, as from `ros2 param set`)
    after = [parameter_value_to_python(v) for v in
             call(GetParameters, "get_parameters", GetParameters.Request(names=names)).values]
    assert after == values


def test_diagnostics(harness: RosHarness):
    diag = node_diagnostics(harness, CAM_A, after=time.monotonic())
    for key in ("input_rate_hz", "processed_fps", "latency_p50_ms", "latency_p95_ms", "inference_p50_ms",
                "inference_p95_ms", "frames_received", "frames_processed", "frames_dropped", "device", "model"):
        assert key in diag, key
    assert diag["device"] == "cpu" and diag["model"].endswith("tiny.safetensors")
    assert int(diag["frames_processed"]) >= 5
    assert 0 < float(diag["inference_p50_ms"]) <= float(diag["latency_p95_ms"])
    seg = node_diagnostics(harness, ": segmenter", after=time.monotonic())
    assert seg["precision"] == "fp32" and int(seg["classes"]) == CAMVID.num_classes


def test_sigint_shuts_down_cleanly(harness: RosHarness, node_proc: Process):
    """Last test of the module: Ctrl-C ends the node with status 0 and no traceback."""
    rc = node_proc.interrupt(timeout=30)
    out = node_proc.output()
    assert rc == 0, out
    assert "Traceback" not in out, out


# ---------------------------------------------------------------------------------------------- start-up errors
@pytest.mark.parametrize("override,message", [
    ("max_batch:=0", "'max_batch' = 0: must be in [1, 64]"),
    ("max_age:=true", "'max_age': expected a double, got bool True"),  # max_age:=1 is taken as 1.0
    ("max_batch:=1e30", "'max_batch': expected a integer, got double 1e+30"),  # max_batch:=2.0 is taken as 2
    ("image_topics:=[]", "'image_topics' = []: must list at least one image topic"),
    ("input_size:=big", "'input_size' = 'big'"),
])
def test_bad_parameter_exits_nonzero(override: str, message: str):
    res = ros_support.run_module("icnet_ros.node_process", ["--ros-args", "-p", override, "-p", "model:=/unused"], 60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and res.stderr.startswith("icnet_node: error: "), res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("content,message", [(None, "checkpoint not found"),
                                             (b"not a safetensors file", "not a readable safetensors file")])
def test_missing_or_invalid_model_exits_nonzero(tmp_path: Path, content: bytes | None, message: str):
    path = tmp_path / "model.safetensors"
    if content is not None:
        path.write_bytes(content)
    res = ros_support.run_module("icnet_ros.node_process", ["--ros-args", "-p", f"model:={path}", "-p", "device:=cpu"], 90)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "icnet_node: error: cannot load model" in res.stderr and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_diagnostics_keep_coming_on_a_simulated_clock_that_does_not_run(harness: RosHarness, checkpoint: Path,
                                                                         tmp_path: Path):
    """use_sim_time with no /clock (before a bag starts, a paused or ended replay): /diagnostics, and its
    'no frames' warning, keep coming; on the ROS clock its timer never fired."""
    ros = harness
    proc = Process("icnet_ros.node_process", ["--ros-args", "-r", "__node:=icnet_sim", "-p", f"model:={checkpoint}",
                                              "-p", "device:=cpu", "-p", "image_topics:=[/cam_sim/image_raw]",
                                              "-p", "use_sim_time:=true", "-p", "diagnostics_period:=0.5"],
                   tmp_path, name="node_sim")
    try:
        proc.wait_for_output("ready:", 120)
        after = time.monotonic()
        values = node_diagnostics(ros, "icnet_sim: /cam_sim/image_raw", after=after, timeout=10.0)
        assert values["frames_received"] == "0", values
        assert proc.interrupt(30) == 0
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_remapped_camera_moves_its_camera_info_and_outputs(ros: RosHarness, checkpoint: Path, tmp_path: Path):
    """``-r /cam_r/image_raw:=/front_r/image_raw`` moves the camera: its camera_info is read from /front_r and its
    outputs go to /front_r/semantic/*, as the ready line says (they stayed under /cam_r, and the camera_info
    subscription listened on /cam_r/camera_info, so no camera_info ever went out)."""
    proc = Process("icnet_ros.node_process", ["--ros-args", "-p", f"model:={checkpoint}", "-p", "device:=cpu",
                                              "-p", "image_topics:=[/cam_r/image_raw]", "-p", "max_age:=5.0",
                                              "-r", "/cam_r/image_raw:=/front_r/image_raw"], tmp_path, name="node_r")
    pub = ros.publisher(Image, "/front_r/image_raw")
    info_pub = ros.publisher(CameraInfo, "/front_r/camera_info")
    label = ros.collect(Image, "/front_r/semantic/label")
    info = ros.collect(CameraInfo, "/front_r/semantic/camera_info")
    try:
        proc.wait_for_output("ready:", 120)
        assert "/front_r/image_raw [" in proc.output() and "-> /front_r/semantic/*" in proc.output()
        for col in (label, info):
            ros.wait_matched(col.subscription)
        ros.wait_matched(pub)
        ros.wait_matched(info_pub)
        send_with_camera_info(ros, pub, info_pub, frame(51), "front_r",
                              lambda t: all(c.wait_for(lambda m: len(m) >= 1, t) for c in (label, info)))
        assert label.messages and info.messages, proc.output()
        assert info.messages[0].header.frame_id == "front_r" and (info.messages[0].width, info.messages[0].height) \
            == (W, H)
        assert proc.interrupt(30) == 0
    finally:
        proc.kill()
        for col in (label, info):
            ros.unsubscribe(col)
        ros.node.destroy_publisher(pub)
        ros.node.destroy_publisher(info_pub)


@pytest.mark.slow
def test_model_resolution_outputs_remapped_names(ros: RosHarness, checkpoint: Path, tmp_path: Path):
    """A second node: outputs at the network's resolution (camera_info scaled to match) and a remapped output."""
    proc = Process("icnet_ros.node_process", ["--ros-args", "-p", f"model:={checkpoint}", "-p", "device:=cpu",
                                      "-p", "image_topics:=[/cam_c/image_raw]", "-p", "input_size:=96x128",
                                      "-p", "output_size:=model", "-p", "max_age:=5.0",
                                      "-r", "/cam_c/semantic/label:=/remapped/label"], tmp_path, name="node_c")
    pub = ros.publisher(Image, "/cam_c/image_raw")
    info_pub = ros.publisher(CameraInfo, "/cam_c/camera_info")
    label = ros.collect(Image, "/remapped/label")
    colour = ros.collect(Image, "/cam_c/semantic/color")
    info = ros.collect(CameraInfo, "/cam_c/semantic/camera_info")
    try:
        proc.wait_for_output("ready:", 120)
        for col in (label, colour, info):
            ros.wait_matched(col.subscription)
        ros.wait_matched(pub)
        send_with_camera_info(ros, pub, info_pub, frame(50), "cam_c",
                              lambda t: all(c.wait_for(lambda m: len(m) >= 1, t) for c in (label, colour, info)))
        assert label.messages and colour.messages and info.messages, proc.output()
        for col in (label, colour):  # the outputs of the frame the first camera_info went out with
            col.wait_for(lambda ms: any(m.header == info.messages[0].header for m in ms), 5)
        first_info = info.messages[0]
        # a camera_info subscriber alone is demand too (as image_transport's CameraPublisher counts it)
        for col in (label, colour):
            ros.unsubscribe(col)
        time.sleep(1.0)  # the node sees the image outputs unsubscribed
        n_info = len(info.messages)
        send_with_camera_info(ros, pub, info_pub, frame(50), "cam_c",
                              lambda t: info.wait_for(lambda m: len(m) > n_info, t))
        assert len(info.messages) > n_info, proc.output()
        assert (info.messages[-1].width, info.messages[-1].height) == (128, 96)
        assert proc.interrupt(30) == 0
    finally:
        proc.kill()
        for col in (label, colour, info):
            ros.unsubscribe(col)
        ros.node.destroy_publisher(pub)
        ros.node.destroy_publisher(info_pub)
    # camera_info goes out only for a frame whose own camera_info (same stamp) the node has: the first frames may
    # have been served before theirs arrived, so compare the outputs of the frame the first camera_info belongs to
    inf = first_info
    lab = next((m for m in label.messages if m.header == inf.header), None)
    col = next((m for m in colour.messages if m.header == inf.header), None)
    assert lab is not None and col is not None, (inf.header, [m.header for m in label.messages])
    assert (lab.height, lab.width) == (96, 128) and (col.height, col.width) == (96, 128)
    assert lab.header == col.header == inf.header and lab.header.frame_id == "cam_c"
    assert (inf.width, inf.height) == (128, 96)
    np.testing.assert_allclose(inf.k, [80.0, 0, 64.0, 0, 80.0, 48.0, 0, 0, 1.0])
