"""icnet_ros: ICNet real-time semantic segmentation, ROS-free core plus a thin ROS 2 node.

Public API: :func:`load_model`, :func:`build_icnet`, :func:`save_checkpoint`, :class:`Segmenter`.
Nothing here imports rclpy.
"""
from typing import Any

from .checkpoint import CheckpointError, load_model, read_metadata, save_checkpoint
from .models import MODEL_CONFIGS, ICNet, ICNetConfig, build_icnet

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ICNet", "ICNetConfig", "MODEL_CONFIGS", "Segmenter", "build_icnet", "load_model",
           "read_metadata", "save_checkpoint", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: the engine pulls in OpenCV
    if name == "Segmenter":
        from .engine import Segmenter

        return Segmenter
    raise AttributeError(f"module 'icnet_ros' has no attribute {name!r}")
