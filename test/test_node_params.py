"""The node's parameters (icnet_ros.node_params) without a node process: the class metadata document, the bounds of
the numeric parameters, and what a real rclpy node gets declared at start-up (read-only descriptors, start-up
validation of the values given)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from icnet_ros import node_params
from icnet_ros.classes import ClassSet
from icnet_ros.ros_image import MAX_MAX_PIXELS
from icnet_ros.sizes import MAX_BATCH, MAX_THREADS


def test_class_metadata_colors_are_rrggbb_in_rgb_order():
    """'#rrggbb' from each [R, G, B] colour: a colour that reads the same either way (CamVid's grey, its road
    (128, 64, 128)) would not show a swap of R and B; (10, 20, 30) does."""
    class_set = ClassSet("test", ("sky", "road", "car"), ((10, 20, 30), (255, 0, 0), (0, 128, 255)), ignore_index=200)
    doc = json.loads(node_params.class_metadata_json(class_set, "m.safetensors"))
    assert doc == {"dataset": "test", "model": "m.safetensors", "ignore_index": 200,
                   "classes": [{"id": 0, "name": "sky", "color": "#0a141e"},
                               {"id": 1, "name": "road", "color": "#ff0000"},
                               {"id": 2, "name": "car", "color": "#0080ff"}]}


@pytest.mark.parametrize("name, highest, above", [
    ("max_pixels", MAX_MAX_PIXELS, MAX_MAX_PIXELS + 1),  # 16384 x 16384 is allowed, one pixel more is not
    ("max_batch", MAX_BATCH, MAX_BATCH + 1),
    ("batch_timeout", 1.0, 1.001),
    ("max_age", 3600.0, 3600.5),
    ("diagnostics_period", 60.0, 60.01),
    ("num_threads", MAX_THREADS, MAX_THREADS + 1),
])
def test_upper_bounds_are_inclusive(name, highest, above):
    """Each range's upper end is a value the parameter takes (the constraint text says "[lo, hi]"); beyond it is
    refused, naming the parameter and the range."""
    assert node_params.check_value(name, highest) == highest
    assert getattr(node_params.parse({name: highest}), name) == highest
    with pytest.raises(node_params.ParameterError, match=rf"parameter '{name}' = .*: must be in \[.*, {highest}\]"):
        node_params.check_value(name, above)


# ------------------------------------------------------------------------------------------- on a real rclpy node
@contextmanager
def _node_with(overrides: dict[str, Any]) -> Iterator[Any]:
    """A plain rclpy node (context of its own) given ``overrides`` as `--ros-args -p` would, before anything is
    declared; destroyed after the block."""
    rclpy = pytest.importorskip("rclpy", reason="rclpy not installed (pip install -e .[ros])")
    from rclpy.parameter import Parameter

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("icnet_params_test", context=ctx,
                             parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


@pytest.mark.ros
def test_declared_descriptors_are_read_only_where_the_spec_says():
    """`ros2 param describe` and rclpy itself see which parameters are read-only: setting one while the node runs is
    refused by rclpy (the node's callback never sees it), a live one goes through."""
    from rclpy.parameter import Parameter

    with _node_with({}) as node:
        values = node_params.declare(node)
        assert values == node_params.defaults()
        for spec in node_params.PARAMS:
            desc = node.describe_parameter(spec.name)
            assert desc.read_only == spec.read_only, spec.name
            assert desc.description == spec.full_description and desc.additional_constraints == spec.constraints
        assert {s.name for s in node_params.PARAMS if s.read_only} >= {"image_topics", "num_threads", "autostart"}
        refused = node.set_parameters([Parameter("image_topics", value=["/other/image_raw"])])[0]
        assert not refused.successful and "read-only" in refused.reason, refused
        assert node.get_parameter("image_topics").value == ["/camera/image_raw"]
        assert node.set_parameters([Parameter("max_age", value=1.0)])[0].successful


@pytest.mark.ros
@pytest.mark.parametrize("given, expected", [(1.5, None), (-0.1, None), (1, 1.0), (0.25, 0.25)])
def test_batch_timeout_is_checked_at_start_up(given, expected):
    """`-p batch_timeout:=1.5` is refused at start-up, naming the parameter and its range (a batch then waited up
    to any time for the other cameras); `:=1` (an integer) is the double 1.0."""
    with _node_with({"batch_timeout": given}) as node:
        values = node_params.declare(node)
        if expected is None:
            with pytest.raises(node_params.ParameterError) as e:
                node_params.parse(values)
            assert str(e.value) == f"parameter 'batch_timeout' = {given}: must be in [0.0, 1.0]"
        else:
            assert node_params.parse(values).batch_timeout == expected
