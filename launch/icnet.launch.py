"""Launch icnet_node (and optionally RViz2).

    ros2 launch icnet_ros icnet.launch.py
    ros2 launch icnet_ros icnet.launch.py image_topics:="[/front/image_raw, /rear/image_raw/compressed]" \
        model:=/path/to/model.safetensors device:=cuda namespace:=robot1 rviz:=true

Parameters come from ``params_file`` (default: the installed config/icnet.yaml); the ``model``, ``image_topics``,
``device`` and ``precision`` arguments override it only when given (empty = keep the file's value). Every other
parameter is set in a copy of the params file. ``image_topics`` takes a YAML list or a comma-separated list.
"""
import os

import yaml
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "icnet_ros"
# launch argument -> icnet_node parameter it overrides when not empty
OVERRIDES = {"model": "model", "image_topics": "image_topics", "device": "device", "precision": "precision"}


def _topics(text):
    """'[/a/image_raw, /b/image_raw]' (YAML) or '/a/image_raw,/b/image_raw' -> a list of topic names."""
    text = text.strip()
    if text.startswith("["):
        value = yaml.safe_load(text)
        return [str(t) for t in value or []]
    return [t for t in (part.strip() for part in text.split(",")) if t]


def _icnet_node(context):
    overrides = {}
    for argument, parameter in OVERRIDES.items():
        value = LaunchConfiguration(argument).perform(context).strip()
        if value:
            overrides[parameter] = _topics(value) if parameter == "image_topics" else value
    params_file = LaunchConfiguration("params_file").perform(context)
    if not os.path.isfile(params_file):
        raise RuntimeError(f"params_file {params_file!r} does not exist")
    return [Node(
        package=PACKAGE,
        executable="icnet_node",
        name="icnet_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[params_file, overrides],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description():
    share = FindPackageShare(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument(
            "params_file", default_value=PathJoinSubstitution([share, "config", "icnet.yaml"]),
            description="YAML file with the icnet_node parameters"),
        DeclareLaunchArgument(
            "model", default_value="",
            description="Path to a .safetensors checkpoint (empty: the params file's value; there, empty = the "
                        "package's default model)"),
        DeclareLaunchArgument(
            "image_topics", default_value="",
            description="Camera topics, YAML list or comma-separated; a topic ending in /compressed is read as "
                        "sensor_msgs/CompressedImage (empty: the params file's value)"),
        DeclareLaunchArgument(
            "device", default_value="",
            description="auto | cpu | cuda | cuda:N (empty: the params file's value)"),
        DeclareLaunchArgument(
            "precision", default_value="",
            description="fp32 | fp16 | bf16 (empty: the params file's value)"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="Namespace of the node (relative image topics resolve inside it)"),
        DeclareLaunchArgument(
            "rviz", default_value="false",
            description="Also start RViz2 with config/icnet.rviz (input, overlay and colour mask)"),
        OpaqueFunction(function=_icnet_node),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", PathJoinSubstitution([share, "config", "icnet.rviz"])],
            condition=IfCondition(LaunchConfiguration("rviz")),
            output="screen",
        ),
    ])
