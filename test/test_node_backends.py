"""The node runs exported models through the same `model` parameter: an ONNX file through ONNX Runtime and an
OpenVINO IR through OpenVINO, over real DDS, with the backend named in the ready line and on /diagnostics, and the
labels those runtimes compute equal to the torch backend's on the same frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ros_support
from helpers import make_checkpoint
from ros_support import Process, RosHarness, diagnostics_values, image_msg, ros  # noqa: F401 - fixture

ros_support.require_rclpy()
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from icnet_ros.engine import Segmenter  # noqa: E402
from icnet_ros.ros_image import image_to_numpy  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]
SIZE = (96, 128)  # the export size (the network input of every frame)


def _export(kind: str, checkpoint: Path, folder: Path) -> Path:
    if kind == "onnxruntime":
        from icnet_ros.export import export_onnx

        return export_onnx(checkpoint, folder / "tiny.onnx", size=SIZE)
    from icnet_ros.backends.openvino import export_openvino

    return export_openvino(checkpoint, folder / "tiny.xml", size=SIZE, progress=False)


@pytest.mark.parametrize("kind, provider", [("onnxruntime", "CPUExecutionProvider"), ("openvino", "CPU")])
def test_node_serves_an_exported_model(ros: RosHarness, tmp_path: Path, kind: str, provider: str):
    checkpoint = make_checkpoint(tmp_path / "tiny.safetensors")
    model = _export(kind, checkpoint, tmp_path)
    topic = f"/exp_{kind}/image_raw"
    proc = Process("icnet_ros.node_process", ["--ros-args", "-p", f"model:={model}", "-p", "device:=cpu",
                                      "-p", f"image_topics:=[{topic}]", "-p", "max_age:=5.0"],
                   tmp_path, name=f"node_{kind}")
    pub = ros.publisher(Image, topic)
    label = ros.collect(Image, f"/exp_{kind}/semantic/label")
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    rng = np.random.default_rng(3)
    img = np.zeros((120, 160, 3), np.uint8)
    img[:60], img[60:, :80], img[60:, 80:] = rng.integers(0, 256, (3, 3))
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    try:
        proc.wait_for_output("ready:", 120)
        ros.wait_matched(label.subscription)
        ros.wait_matched(pub)
        for _ in range(5):  # best-effort input: resend until served
            pub.publish(image_msg(img, "rgb8", ros.now().to_msg(), frame_id="cam"))
            if label.wait_for(lambda m: len(m) >= 1, 6):
                break
        assert label.messages, proc.output()
        # the configured segmenter's status (one from before the model was loaded says only that)
        assert diags.wait_for(lambda ms: "backend" in (diagnostics_values(ms, "segmenter") or {}), 10)
        values = diagnostics_values(diags.messages, "segmenter")
        assert values["backend"] == kind and values["provider"] == provider
        assert f"backend {kind} ({provider})" in proc.output()
        assert proc.interrupt(30) == 0
    finally:
        proc.kill()
        ros.unsubscribe(label)
        ros.unsubscribe(diags)
        ros.node.destroy_publisher(pub)
    got = image_to_numpy(label.messages[0])
    ref = Segmenter(checkpoint, device="cpu", input_size=SIZE, warmup=False).segment([img])[0].label
    assert got.shape == ref.shape == img.shape[:2]
    assert (got == ref).mean() >= 0.999
