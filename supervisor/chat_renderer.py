"""Chat prompts rendered off the daemon's event loop, in renderer processes with limits.

A chat template comes from a model file and may be hostile: nested loops that never end, a
prompt of hundreds of MB, deep recursion. A thread cannot be stopped, so each render runs in a
renderer process (supervisor/chat_render_main.py) with a memory limit, and one that takes
longer than RENDER_TIMEOUT is killed. Processes are started on first use and kept (at most
MAX_IDLE) for the next render; one that was killed or whose render was abandoned is never
reused. At most MAX_RENDERS render at once; the rest wait their turn.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import trio

from actors.children import open_child
from actors.errors import InvalidInput
from actors.frames import FrameError, FrameReader, encode_frame
from supervisor.chat_template import LIMIT, TemplateRefused, check_template_size

RENDER_TIMEOUT = 2.0  # seconds; a real template renders in milliseconds
MAX_IDLE = 2
MAX_RENDERS = 4


class _Renderer:
    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.stdin = process.stdin
        self.stdout = process.stdout
        self._frames = FrameReader(process.stdout)

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.stdin.send_all(encode_frame(request))
        answer = await self._frames.receive()
        if answer is None:
            raise EOFError
        return answer

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


class ChatRenderer:
    """Renders chat prompts in renderer processes. `render` raises TemplateRefused."""

    def __init__(self, *, timeout: float = RENDER_TIMEOUT) -> None:
        self.timeout = timeout
        self._idle: list[_Renderer] = []
        self._turns = trio.Semaphore(MAX_RENDERS)
        self._closed = False

    async def _take(self) -> _Renderer:
        while self._idle:
            renderer = self._idle.pop()
            if renderer.process.returncode is None:
                return renderer
        process = await open_child("supervisor.chat_render_main", [str(os.getpid())],
                                   stderr=subprocess.DEVNULL)
        return _Renderer(process)

    async def render(self, template: str | None, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages` by `template` (None: modeld's plain template).

        Raises TemplateRefused: the template refused the messages, failed, or went beyond a
        limit (its size, RENDER_TIMEOUT, the renderer's memory, the prompt's size).
        """
        check_template_size(template)  # before anything is sent
        async with self._turns:
            renderer = await self._take()
            reusable = False
            try:
                with trio.move_on_after(self.timeout) as scope:
                    answer = await renderer.ask({"template": template, "messages": messages})
                if scope.cancelled_caught:
                    raise TemplateRefused(LIMIT, "the model's chat template took longer than "
                                          f"{self.timeout:g} s to render")
                reusable = True
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                    FrameError):  # it died (e.g. out of memory) or wrote garbage
                raise TemplateRefused(LIMIT, "the model's chat template broke its renderer "
                                      "process (out of memory or a crash)") from None
            finally:
                if reusable and not self._closed and len(self._idle) < MAX_IDLE:
                    self._idle.append(renderer)
                else:
                    await _discard(renderer)
        if "prompt" in answer:
            return str(answer["prompt"])
        raise TemplateRefused(str(answer.get("kind", LIMIT)), str(answer.get("reason")))

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for renderer in idle:
            await _discard(renderer)


async def _discard(renderer: _Renderer) -> None:
    """Kill and reap (shielded: this runs in `finally` blocks, also on cancellation)."""
    renderer.kill()
    with trio.CancelScope(shield=True):
        await renderer.stdin.aclose()
        await renderer.stdout.aclose()
        await renderer.process.wait()


# What the template check renders: llama.cpp renders such example messages when it loads.
_SAMPLE_CHAT = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"},
                {"role": "user", "content": "How are you?"}]


async def check_template_for_llama_cpp(renderer: ChatRenderer, template: str) -> None:
    """llama.cpp renders a file's chat template already at load, in the worker and without a
    limit: a hostile one would hold the load until load_timeout. modeld's renderer tries it
    first, within its limits. Raises InvalidInput (chat_template_limit) when it goes beyond
    one; a template jinja2 cannot render is left to llama.cpp, which judges it itself.

    The template comes from the header the load has read already: parsing it again here (a
    vocabulary of 262k tokens takes ~80 ms) was on the path of every llama.cpp load."""
    try:
        await renderer.render(template, _SAMPLE_CHAT)
    except TemplateRefused as exc:
        if exc.kind == LIMIT:
            raise InvalidInput(str(exc), code="chat_template_limit") from None
