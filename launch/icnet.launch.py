"""Launch icnet_node (and optionally RViz2).

    ros2 launch icnet_ros icnet.launch.py
    ros2 launch icnet_ros icnet.launch.py image_topics:="[/front/image_raw, /rear/image_raw/compressed]" \
        model:=/path/to/model.safetensors device:=cuda namespace:=robot1 rviz:=true
    ros2 launch icnet_ros icnet.launch.py autostart:=false   # a lifecycle manager configures and activates it

Parameters come from ``params_file`` (default: the installed config/icnet.yaml); the ``model``, ``image_topics``,
``device``, ``precision``, ``autostart`` and ``use_sim_time`` arguments override it only when given (empty = keep the
file's value).
Every other parameter is set in a copy of the params file. ``image_topics`` takes a YAML list or a comma-separated
list. The overrides are checked with the node's own validation (icnet_ros.node_params) before the node starts: a bad one
(an empty or malformed ``image_topics``, an unknown device) ends the launch with the node's one-line error.
``rviz:=true`` starts RViz2 when it is installed (config/icnet.rviz, its displays on the first camera's input,
overlay and colour mask), and otherwise says so and starts the node alone; a value other than true or false (or a
``model`` that is not a file) ends the launch before anything starts.

The launch ends when the node ends (RViz with it): with status 0 when the node exited 0 (a lifecycle shutdown,
Ctrl-C), otherwise with a failure status and a line naming the node's exit status, so that a supervisor sees a node
that could not start (a model that does not load, a missing GPU, cameras that collide) as a failure.
"""
import atexit
import os
import tempfile

import yaml
from ament_index_python.packages import PackageNotFoundError, get_package_prefix
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, RegisterEventHandler, Shutdown
from launch.event_handlers import OnProcessExit
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from icnet_ros import node_params
from icnet_ros.node_params import NODE_NAME, ParameterError, check_params_file_values, check_value

PACKAGE = "icnet_ros"
# launch argument -> icnet_node parameter it overrides when not empty
OVERRIDES = {"model": "model", "image_topics": "image_topics", "device": "device", "precision": "precision",
             "autostart": "autostart"}
BOOLEANS = {"true": True, "false": False}


def _topics(text):
    """'[/a/image_raw, /b/image_raw]' (YAML) or '/a/image_raw,/b/image_raw' -> a list of topic names.

    Text that is not a YAML list of names comes back unchanged (a string), which the node's validation rejects
    ("expected a string_array")."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if not isinstance(value, list) or not all(isinstance(t, (str, int, float)) for t in value):
            return text
        return [str(t) for t in value]
    return [t for t in (part.strip() for part in text.split(",")) if t]


def _icnet_node(context):
    overrides = {}
    for argument, parameter in OVERRIDES.items():
        value = LaunchConfiguration(argument).perform(context).strip()
        if value:
            if parameter == "image_topics":
                value = _topics(value)
            elif parameter == "autostart":
                value = BOOLEANS.get(value.lower(), value)
            try:  # the node's own validation: launch_ros cannot even pass an empty list on to the node
                overrides[parameter] = check_value(parameter, value)
            except ParameterError as e:
                raise RuntimeError(f"{NODE_NAME}: error: {e}") from None
    params_file = LaunchConfiguration("params_file").perform(context)
    if not os.path.isfile(params_file):
        raise RuntimeError(f"params_file {params_file!r} is not a file" if os.path.exists(params_file)
                           else f"params_file {params_file!r} does not exist")
    try:  # the file's values too: a bad one made the node exit 2 while `ros2 launch` exited 0
        with open(params_file, encoding="utf-8") as f:
            from_file = check_params_file_values(yaml.safe_load(f), NODE_NAME,
                                                 LaunchConfiguration("namespace").perform(context), skip=overrides)
    except ParameterError as e:
        raise RuntimeError(f"{NODE_NAME}: error: {e} (in {params_file})") from None
    except (OSError, yaml.YAMLError):
        from_file = {}  # unreadable or not YAML: the node's own one-line error says so
    _rviz_topics(context, overrides.get("image_topics", from_file.get("image_topics")),
                 from_file.get("output_namespace"))
    model = overrides.get("model", from_file.get("model"))
    if model and not os.path.isfile(os.path.expanduser(model)):  # the node would exit 2 while the launch exits 0
        raise RuntimeError(f"{NODE_NAME}: error: model {model!r} is not a file")
    use_sim_time = LaunchConfiguration("use_sim_time").perform(context).lower()
    if use_sim_time:  # rclpy's own parameter (choices: true, false or empty)
        overrides["use_sim_time"] = BOOLEANS[use_sim_time]
    node = Node(
        package=PACKAGE,
        executable="icnet_node",
        name="icnet_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[params_file, overrides],
        output="screen",
        emulate_tty=True,
    )
    return [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_node_exited))]


def _node_exited(event, context):
    """The node ended: so does the launch (RViz too); a failure status is the launch's failure."""
    if event.returncode:  # launch reports the exception in one line and exits 1
        raise RuntimeError(f"{NODE_NAME} exited with status {event.returncode}; the launch ends with it")
    return [Shutdown(reason=f"{NODE_NAME} exited")]


#: the topics config/icnet.rviz displays (those of the default camera), in the order RVIZ_TOPICS lists them
RVIZ_TOPICS = ("/camera/image_raw", "/camera/semantic/overlay", "/camera/semantic/color")


def _rviz_topics(context, image_topics, output_namespace):
    """Remember, for _rviz, the topics of the first camera as the node resolves them (relative names inside the
    namespace): its input, overlay and colour mask."""
    defaults = node_params.defaults()
    topics = image_topics if isinstance(image_topics, list) and image_topics else defaults["image_topics"]
    namespace = LaunchConfiguration("namespace").perform(context).strip("/")
    first = str(topics[0])
    node = f"/{namespace}/{NODE_NAME}" if namespace else f"/{NODE_NAME}"
    if first.startswith("~"):  # the node's private namespace (RViz would resolve '~' against its own)
        first = node + first[1:]
    elif not first.startswith("/"):
        first = f"/{namespace}/{first}" if namespace else f"/{first}"
    out = output_namespace if isinstance(output_namespace, str) and output_namespace else defaults["output_namespace"]
    base = node_params.base_topic(first)[0]
    shown = (first, *(node_params.sibling_topic(base, f"{out}/{kind}") for kind in ("overlay", "color")))
    context.launch_configurations["_icnet_rviz_topics"] = "\n".join(shown)


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _rviz(context):
    """RViz2 with config/icnet.rviz, its displays on the first camera's topics, when it is installed; otherwise a
    note (the node starts anyway)."""
    try:
        get_package_prefix("rviz2")
    except PackageNotFoundError:
        return [LogInfo(msg="rviz:=true but rviz2 is not installed (apt install ros-$ROS_DISTRO-rviz2); "
                            "starting icnet_node without it")]
    config = PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "icnet.rviz"]).perform(context)
    shown = context.launch_configurations.get("_icnet_rviz_topics", "").split("\n")
    if len(shown) == len(RVIZ_TOPICS) and tuple(shown) != RVIZ_TOPICS:  # a copy showing this launch's camera
        with open(config, encoding="utf-8") as f:
            text = f.read()
        for default, topic in zip(RVIZ_TOPICS, shown):
            text = text.replace(f"Value: {default}\n", f"Value: {topic}\n")
        with tempfile.NamedTemporaryFile("w", suffix=".rviz", prefix="icnet_", delete=False) as f:
            f.write(text)
        config = f.name
        atexit.register(_remove, config)  # when the launch ends
    return [Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", config],
        output="screen",
    )]


def generate_launch_description():
    share = FindPackageShare(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument(
            "params_file", default_value=PathJoinSubstitution([share, "config", "icnet.yaml"]),
            description="YAML file with the icnet_node parameters"),
        DeclareLaunchArgument(
            "model", default_value="",
            description="Path to a model: a .safetensors checkpoint or an exported .onnx, .xml (OpenVINO) or "
                        ".engine/.plan (TensorRT) file (empty: the params file's value; there, empty = the package's "
                        "default model)"),
        DeclareLaunchArgument(
            "image_topics", default_value="",
            description="Camera topics, YAML list or comma-separated; a topic ending in /compressed is read as "
                        "sensor_msgs/CompressedImage (empty: the params file's value)"),
        DeclareLaunchArgument(
            "device", default_value="",
            description="auto | cpu | cuda | cuda:N | xpu | xpu:N (xpu: an Intel GPU, openvino backend; empty: the "
                        "params file's value)"),
        DeclareLaunchArgument(
            "precision", default_value="",
            description="fp32 | fp16 | bf16 (empty: the params file's value)"),
        DeclareLaunchArgument(
            "autostart", default_value="",
            description="true: the node configures and activates itself (the params file's default); false: it "
                        "stays unconfigured for a lifecycle manager (`ros2 lifecycle set /icnet_node configure`)"),
        DeclareLaunchArgument(
            "use_sim_time", default_value="", choices=["true", "false", "True", "False", ""],
            description="true: the node's clock follows /clock (a simulator, `ros2 bag play --clock`); empty: the "
                        "params file's value (there, unset = false)"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="Namespace of the node (relative image topics resolve inside it)"),
        DeclareLaunchArgument(
            "rviz", default_value="false", choices=["true", "false", "True", "False", "1", "0"],
            description="Also start RViz2 with config/icnet.rviz (input, overlay and colour mask)"),
        OpaqueFunction(function=_icnet_node),
        OpaqueFunction(function=_rviz, condition=IfCondition(LaunchConfiguration("rviz"))),
    ])
