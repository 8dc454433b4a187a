"""Console-script entry points of the tools whose modules import torch when they are imported (icnet-eval,
icnet-train, icnet-bench): the signal handlers come first, so that Ctrl-C or SIGTERM during those 1-3 s of imports
is the tool's one line ``TOOL: interrupted`` and exit status 130 / 143, as later in the run, not a KeyboardInterrupt
traceback (Ctrl-C) or a silent death (SIGTERM). Only the wrapper's own start (the interpreter, before this module
runs) is left without them. The other tools import their heavy modules inside ``main`` already."""
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
