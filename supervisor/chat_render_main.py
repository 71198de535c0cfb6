"""The renderer process: renders chat prompts (supervisor/chat_template.py) one at a time, for
the daemon (supervisor/chat_renderer.py), under a memory limit. The daemon kills it when a
render takes too long.

Frames on stdin and stdout: a 4-byte big-endian length, then that many bytes of JSON. A
request is `{"template": str | null, "messages": [...]}`; the answer `{"prompt": str}` or
`{"kind": ..., "reason": ...}`. EOF on stdin ends the process.
"""

from __future__ import annotations

import json
import resource
import signal
import struct
import sys
from typing import Any, BinaryIO

from supervisor.chat_template import LIMIT, TemplateRefused, render

MEMORY_LIMIT = 512 * 1024 * 1024  # address space of this process


def read_frame(stream: BinaryIO) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (length,) = struct.unpack(">I", head)
    return json.loads(stream.read(length))


def write_frame(stream: BinaryIO, value: Any) -> None:
    data = json.dumps(value).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def answer(request: Any) -> dict[str, str]:
    try:
        return {"prompt": render(request["template"], request["messages"])}
    except TemplateRefused as exc:
        return {"kind": exc.kind, "reason": str(exc)}
    except MemoryError:
        return {"kind": LIMIT, "reason": "the model's chat template needs more memory than "
                "modeld gives a render"}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C at a terminal is the daemon's
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (request := read_frame(stdin)) is not None:
        write_frame(stdout, answer(request))


if __name__ == "__main__":
    main()
