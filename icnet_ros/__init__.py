"""icnet_ros: ICNet real-time semantic segmentation, ROS-free core plus a thin ROS 2 node.

Public API: :func:`load_model`, :func:`build_icnet`, :func:`save_checkpoint`, :func:`read_metadata`,
:class:`Segmenter`, :class:`CheckpointError`. Nothing here imports rclpy, and attributes load lazily, so the ROS
tools that never touch PyTorch (``icnet-play``, ``icnet-record``) start without importing it.
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CheckpointError": "checkpoint", "load_model": "checkpoint", "read_metadata": "checkpoint",
    "save_checkpoint": "checkpoint", "ICNet": "models", "ICNetConfig": "models", "MODEL_CONFIGS": "models",
    "build_icnet": "models", "Segmenter": "engine",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'icnet_ros' has no attribute {name!r}")
