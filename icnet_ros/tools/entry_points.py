"""Console-script entry points of the tools whose modules import heavy libraries when they are imported (torch:
icnet-eval, icnet-train, icnet-bench, icnet-export; numpy / OpenCV: icnet-play, icnet-record, icnet-convert,
icnet-node-bench, icnet-node-soak): the signal handlers come first, so that Ctrl-C or SIGTERM during those 0.1-3 s of imports is the
tool's one line ``TOOL: interrupted`` and exit status 130 / 143, as later in the run, not a KeyboardInterrupt
traceback (Ctrl-C) or a silent death (SIGTERM). Only the wrapper's own start (the interpreter, before this module
runs) is left without them. The other tools (icnet-demo, icnet-segment) import their heavy modules
inside ``main`` already."""
from __future__ import annotations

import importlib
from collections.abc import Callable

from .cli_checks import run_stoppable


def _entry_point(tool: str, module: str) -> Callable[[], int]:
    """The console script of ``tool``: ``module``'s main, imported and run under the stop signals' handlers (the
    tool's main installs its own, nested: ours come back at its end)."""
    def run() -> int:
        return run_stoppable(tool, lambda stop: importlib.import_module(module).main())

    run.__name__ = run.__qualname__ = tool.replace("-", "_")
    return run


icnet_eval = _entry_point("icnet-eval", "icnet_ros.evaluate")
icnet_train = _entry_point("icnet-train", "icnet_ros.train")
icnet_bench = _entry_point("icnet-bench", "icnet_ros.tools.bench")
icnet_play = _entry_point("icnet-play", "icnet_ros.tools.play")
icnet_record = _entry_point("icnet-record", "icnet_ros.tools.record")
icnet_convert = _entry_point("icnet-convert", "icnet_ros.tools.convert")
icnet_export = _entry_point("icnet-export", "icnet_ros.tools.export")
icnet_node_bench = _entry_point("icnet-node-bench", "icnet_ros.tools.node_bench")
icnet_node_soak = _entry_point("icnet-node-soak", "icnet_ros.tools.soak")
