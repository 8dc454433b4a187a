"""Spinning an rclpy executor while other threads create and destroy entities.

rclpy's executors collect a node's entities, then add them to a wait set. A subscription or publisher destroyed by
another thread in between leaves its QoS event handler in that list, and adding it raises ``InvalidHandle`` ("cannot
use Destroyable because destruction was requested") in the spinning thread (ros2/rclpy#1284, #1206). With a plain
``executor.spin()`` in a background thread, that ends the thread: every later message is silently lost. The next
wait set no longer holds the destroyed entity, so spinning on is the fix.
"""
from __future__ import annotations

from time import monotonic
from typing import Any

#: InvalidHandle errors in a row (each within RETRY_WINDOW_S of the one before) after which the error is real: a
#: wait set that can never be built. Races far apart (a long-running process) never add up to it.
MAX_CONSECUTIVE_INVALID = 100
RETRY_WINDOW_S = 1.0


def spin(executor: Any) -> None:
    """``executor.spin()`` until the executor or its context shuts down, surviving the destroy race above."""
    from rclpy.executors import ExternalShutdownException
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    failures, last = 0, float("-inf")
    while True:
        try:
            executor.spin()
            return
        except ExternalShutdownException:
            return
        except _rclpy.InvalidHandle:
            now = monotonic()
            failures = failures + 1 if now - last <= RETRY_WINDOW_S else 1
            last = now
            if failures >= MAX_CONSECUTIVE_INVALID:
                raise
