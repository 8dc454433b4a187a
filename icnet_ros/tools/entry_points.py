"""Console-script entry points of the tools whose modules import heavy libraries when they are imported (torch:
icnet-eval, icnet-train, icnet-bench; numpy / OpenCV: icnet-play, icnet-record, icnet-convert, icnet-node-bench,
icnet-node-soak): the signal handlers come first, so that Ctrl-C or SIGTERM during those 0.1-3 s of imports is the
tool's one line ``TOOL: interrupted`` and exit status 130 / 143, as later in the run, not a KeyboardInterrupt
traceback (Ctrl-C) or a silent death (SIGTERM). Only the wrapper's own start (the interpreter, before this module
runs) is left without them. The other tools (icnet-demo, icnet-segment, icnet-export) import their heavy modules
inside ``main`` already."""
from __future__ import annotations

import importlib

from .cli_checks import run_stoppable


def _run(tool: str, module: str) -> int:
    # the tool's main installs its own handlers (nested: ours come back at its end)
    return run_stoppable(tool, lambda stop: importlib.import_module(module).main())


def icnet_eval() -> int:
    return _run("icnet-eval", "icnet_ros.evaluate")


def icnet_train() -> int:
    return _run("icnet-train", "icnet_ros.train")


def icnet_bench() -> int:
    return _run("icnet-bench", "icnet_ros.tools.bench")


def icnet_play() -> int:
    return _run("icnet-play", "icnet_ros.tools.play")


def icnet_record() -> int:
    return _run("icnet-record", "icnet_ros.tools.record")


def icnet_convert() -> int:
    return _run("icnet-convert", "icnet_ros.tools.convert")


def icnet_node_bench() -> int:
    return _run("icnet-node-bench", "icnet_ros.tools.node_bench")


def icnet_node_soak() -> int:
    return _run("icnet-node-soak", "icnet_ros.tools.soak")
