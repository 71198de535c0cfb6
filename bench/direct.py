"""The reference for the load benchmark: ctransformers loading in one long-lived process, with
the options actors/worker_main.py uses (its own Backend class, so the two cannot drift apart).

Protocol: one line `PATH CONTEXT_LENGTH THREADS` on stdin -> one line `SECONDS` on stdout (the
load, model freed again right after). `python -m bench.direct` prints `ready` once imported.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

from actors.backends.ctransformers import CTransformersBackend as Backend
from actors.backends.ctransformers import pick_lib


def main() -> None:
    lib = pick_lib()
    import ctransformers  # noqa: F401  (imported before timing, as in a running process)

    print("ready", flush=True)
    for line in sys.stdin:
        path, context, threads = line.split()
        started = time.perf_counter()
        backend = Backend(Path(path), model_type="llama", context_length=int(context),
                          threads=int(threads), lib=lib)
        seconds = time.perf_counter() - started
        del backend
        gc.collect()
        print(f"{seconds:.6f}", flush=True)


if __name__ == "__main__":
    main()
