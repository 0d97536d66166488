"""``python -m dfatorch``: the command line."""

import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
    # A rank of a data-parallel job (`launch`, torchrun) leaves without interpreter finalisation:
    # gloo's worker threads may still hold tensors then, and destroying them during finalisation
    # can abort the rank ("terminate called without an active exception", SIGABRT) after its run
    # finished, failing the job. By now every file is written and closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
