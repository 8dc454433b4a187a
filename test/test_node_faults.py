"""icnet_node's fault path in a real node process: an unrecoverable device error ends the node with ERROR on
/diagnostics and exit status 1 (so that launch's ``respawn`` restarts it).

No GPU exists here, so a sticky CUDA error cannot happen for real: the node process runs the real node with a real
checkpoint, and only the network forward of frames of one size (96 rows, not the warm-up size) raises the error a
poisoned CUDA context raises (``torch.AcceleratorError``), injected at the engine boundary by a two-line wrapper.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ros_support
from helpers import make_checkpoint
from ros_support import RosHarness, diagnostics_values, image_msg, ros  # noqa: F401 - fixture

ros_support.require_rclpy()

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]

FAULTY_NODE = '''
import sys
import torch
from icnet_ros import engine, node_process

real = engine.Segmenter.forward

def forward(self, x):
    if x.shape[2] == 96:  # test frames only, not the warm-up
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return real(self, x)

engine.Segmenter.forward = forward
sys.exit(node_process.main())
'''


def test_unrecoverable_device_error_reports_error_and_exits_1(ros: RosHarness, tmp_path: Path):
    checkpoint = make_checkpoint(tmp_path / "tiny.safetensors")
    script = tmp_path / "faulty_node.py"
    script.write_text(FAULTY_NODE)
    log = open(tmp_path / "node.log", "w+b")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, str(script), "--ros-args", "-p", f"model:={checkpoint}", "-p",
                             "device:=cpu", "-p", "image_topics:=[/fault/image_raw]", "-p", "diagnostics_period:=0.5"],
                            stdout=log, stderr=subprocess.STDOUT, env=ros_support.subprocess_env(),
                            cwd=str(ros_support.REPO))
    pub = ros.publisher(Image, "/fault/image_raw")
    label = ros.collect(Image, "/fault/semantic/label")
    diag = ros.collect(DiagnosticArray, "/diagnostics")

    def output() -> str:
        log.flush()
        return (tmp_path / "node.log").read_text(errors="replace")

    try:
        ros.wait_until(lambda: "ready:" in output() or proc.poll() is not None, 120, "the node to start")
        ros.wait_matched(pub)
        ros.wait_matched(label.subscription)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # best-effort input: resend until it fails
            pub.publish(image_msg(np.zeros((96, 128, 3), np.uint8), "rgb8", ros.now().to_msg()))
            time.sleep(0.5)
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        ros.unsubscribe(label)
        ros.unsubscribe(diag)
        ros.node.destroy_publisher(pub)
    out = (tmp_path / "node.log").read_text(errors="replace")
    assert status == 1, out
    assert "unrecoverable device error" in out and "illegal memory access" in out and "Traceback" not in out, out
    assert not label.messages
    errors = [st for arr in diag.messages for st in arr.status if st.level == DiagnosticStatus.ERROR]
    assert errors and "illegal memory access" in errors[-1].message, [a.status for a in diag.messages][-1:]
    values = diagnostics_values(diag.messages, ": segmenter")
    assert values is not None and int(values["fault_device_error"]) >= 1
