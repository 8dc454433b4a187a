"""Checks the command-line tools run on their arguments before any work starts, so that a bad value is one line
and exit status 2 at once, never a traceback or a failure after a long run."""
from __future__ import annotations

import os
from pathlib import Path


def _file_in_the_way(p: Path) -> Path | None:
    """The first of ``p``'s parent folders that exists as a file (no folder can be made below it)."""
    return next((d for d in reversed(p.parents) if d.exists() and not d.is_dir()), None)


def output_file_problem(path: str | None, flag: str = "--json") -> str | None:
    """Why a result file cannot be written at ``path`` at the end of a run (None when it can; ``-`` is stdout). Its
    folder is created now, so a typo in it fails before the run, not after."""
    if not path or path == "-":
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        return f"{flag} {path}: is a folder, not a file"
    blocking = _file_in_the_way(p)
    if blocking is not None:
        return f"{flag} {path}: {blocking} is a file, not a folder"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: cannot create its folder: {e.strerror or e}"
    if not os.access(p.parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: the folder {p.parent} is not writable"
    return None


def output_folder_problem(path: str, flag: str = "--output") -> str | None:
    """Why ``path`` cannot be (or become) an output folder (None when it can): a file is in the way."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{flag} {path}: is a file, not a folder"
    blocking = _file_in_the_way(p)
    if blocking is not None:
        return f"{flag} {path}: {blocking} is a file, not a folder"
    return None


def topic_problem(topic: str, flag: str = "--topic", node_name: str = "node") -> str | None:
    """Why ``topic`` cannot be a ROS topic name (None when it can), checked as rclpy checks it when a publisher or
    subscription is created (node ``node_name`` in the root namespace), without creating a node."""
    from rclpy.exceptions import NameValidationException
    from rclpy.expand_topic_name import expand_topic_name
    from rclpy.validate_full_topic_name import validate_full_topic_name
    from rclpy.validate_topic_name import validate_topic_name

    try:
        validate_topic_name(topic)
        validate_full_topic_name(expand_topic_name(topic, node_name, "/"))
    except NameValidationException as e:
        # "Invalid topic name: <reason>:\n  '<name>'\n  ^" -> "<reason>"
        reason = str(e).splitlines()[0].removeprefix("Invalid topic name: ").rstrip(":")
    except ValueError as e:  # rcl's expansion: "topic name 'x' is invalid: <reason>, at <file>:<line>"
        reason = str(e).split(" is invalid: ", 1)[-1].rsplit(", at ", 1)[0]
    else:
        return None
    return f"{flag} {topic!r}: not a valid ROS topic name ({reason})"


def model_problem(model: str, backend: str = "auto") -> str | None:
    """Why ``model`` cannot be loaded by the node (None when it looks loadable): unknown file type, missing file,
    or (native checkpoints) unreadable metadata. ``backend``: the engine's backend option (auto: by the file type).
    The full load happens later; this catches typos in a second."""
    from ..checkpoint import CheckpointError, read_metadata
    from ..engine import backend_for

    try:
        if backend_for(model, backend) == "torch":
            read_metadata(model)
        elif not Path(model).expanduser().is_file():
            raise CheckpointError(f"model file not found: {model}")
    except CheckpointError as e:
        return str(e)
    return None


__all__ = ["model_problem", "output_file_problem", "output_folder_problem", "topic_problem"]
