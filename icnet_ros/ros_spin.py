"""Spinning an rclpy executor while other threads create and destroy entities.

rclpy's executors collect a node's entities, then add them to a wait set. A subscription or publisher destroyed by
another thread in between leaves its QoS event handler in that list, and adding it raises ``InvalidHandle`` ("cannot
use Destroyable because destruction was requested") in the spinning thread (ros2/rclpy#1284, #1206). With a plain
``executor.spin()`` in a background thread, that ends the thread: every later message is silently lost. The next
wait set no longer holds the destroyed entity, so spinning on is the fix.
"""
from __future__ import annotations

from typing import Any

#: consecutive InvalidHandle errors after which the error is real (a wait set that can never be built)
MAX_CONSECUTIVE_INVALID = 100


def spin(executor: Any) -> None:
    """``executor.spin()`` until the executor or its context shuts down, surviving the destroy race above."""
    from rclpy.executors import ExternalShutdownException
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    failures = 0
    while True:
        try:
            executor.spin()
            return
        except ExternalShutdownException:
            return
        except _rclpy.InvalidHandle:
            failures += 1
            if failures >= MAX_CONSECUTIVE_INVALID:
                raise
