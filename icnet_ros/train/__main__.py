"""``python -m icnet_ros.train`` and ``torchrun ... -m icnet_ros.train``: the icnet-train command line."""
import os
import sys

from .cli import main

if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun worker: everything is written and the process group destroyed. Skip the interpreter's
        # finalisation, where Gloo's C++ threads can still be torn down and abort the process ("terminate called
        # without an active exception", SIGABRT; seen once in the 2-process test after a complete run), which
        # torchrun would report as a failed training
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
