"""Starting the daemon's child processes (inference workers, download pumps) the one way: this
interpreter, `-m` a module of this source tree, frames on stdin and stdout (actors/frames.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


async def open_child(module: str, args: Sequence[str], *, python: str = sys.executable,
                     stderr: int | None = None, pass_fds: Sequence[int] = ()) -> trio.Process:
    """Start `python -m module args...` with piped stdin and stdout. Raises OSError when it
    cannot start."""
    env = dict(os.environ)
    # -m must import from this source tree whatever the cwd.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return await trio.lowlevel.open_process(
        [python, "-m", module, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=stderr, pass_fds=tuple(pass_fds), env=env)
