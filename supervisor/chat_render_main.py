"""The renderer process: renders chat prompts (supervisor/chat_template.py) one at a time, for
the daemon (supervisor/chat_renderer.py), under a memory limit. The daemon kills it when a
render takes too long.

Frames (actors/frames.py) on stdin and stdout. A request is `{"template": str | null,
"messages": [...]}`; the answer `{"prompt": str}` or `{"kind": ..., "reason": ...}`. EOF on
stdin ends the process. Its one argument is the daemon's pid: once its parent is another
process, it exits, even mid-render.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import threading
import time
from typing import Any

from actors.frames import FrameError, FrameWriter, read_frame
from supervisor.chat_template import LIMIT, TemplateRefused, render

MEMORY_LIMIT = 512 * 1024 * 1024  # address space of this process


def answer(request: Any) -> dict[str, str]:
    try:
        return {"prompt": render(request["template"], request["messages"])}
    except TemplateRefused as exc:
        return {"kind": exc.kind, "reason": str(exc)}
    except MemoryError:
        return {"kind": LIMIT, "reason": "the model's chat template needs more memory than "
                "modeld gives a render"}


def _watch_the_daemon(daemon: int) -> None:
    """A render in progress when the daemon dies (SIGKILL) must not spin on: once this
    process's parent is another, it exits. (EOF on stdin ends it between renders.)"""
    while True:
        time.sleep(1.0)
        if os.getppid() != daemon:
            os._exit(0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C at a terminal is the daemon's
    # The daemon's pid comes as the argument: it may have died before this line runs
    daemon = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()
    threading.Thread(target=_watch_the_daemon, args=(daemon,), daemon=True).start()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    out = FrameWriter(sys.stdout.buffer)
    while (request := read_frame(0)) is not None:
        try:
            out.send(answer(request))
        except FrameError as exc:  # a prompt that cannot be a frame (lone surrogates)
            out.send({"kind": LIMIT, "reason": f"the rendered prompt cannot be sent: {exc}"})


if __name__ == "__main__":
    main()
