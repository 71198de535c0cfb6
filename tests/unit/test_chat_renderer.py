"""The chat renderer on its own: real renderer processes, hostile templates. Each refusal
names its reason and comes within the time limit; the renderer keeps serving after each."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import trio

from supervisor.chat_renderer import ChatRenderer
from supervisor.chat_template import FAILED, LIMIT, MAX_PROMPT, MAX_TEMPLATE, TemplateRefused
from tests.daemon import ROOT

MESSAGES = [{"role": "user", "content": "Hi"}]
GOOD = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
NESTED_LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                "{% endfor %}")


@pytest.mark.parametrize(
    ("template", "kind", "words"),
    [
        (NESTED_LOOPS, LIMIT, "took longer than 1 s"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", LIMIT,
         f"more than {MAX_PROMPT} characters"),
        ("{{ 'x' * 600000000 }}", LIMIT, "more memory"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", LIMIT, "recurses too deeply"),
        ("x" * (MAX_TEMPLATE + 1), LIMIT, f"more than the {MAX_TEMPLATE}"),
        ("{% for %}", FAILED, "failed"),
        ("{{ raise_exception('no system role') }}", "refused", "no system role"),
    ],
    ids=["time", "prompt-size", "memory", "recursion", "template-size", "syntax", "refused"],
)
async def test_hostile_templates_are_refused_with_their_reason(template: str, kind: str,
                                                               words: str) -> None:
    renderer = ChatRenderer(timeout=1.0)
    try:
        with trio.fail_after(20):
            started = time.monotonic()
            with pytest.raises(TemplateRefused, match=words) as caught:
                await renderer.render(template, MESSAGES)
            assert kind == caught.value.kind
            assert time.monotonic() - started < 10
            # and the renderer still renders (a fresh process where the last one was killed)
            assert "<user>Hi" == await renderer.render(GOOD, MESSAGES)
    finally:
        await renderer.aclose()


async def test_renderer_processes_are_reused_and_closed() -> None:
    renderer = ChatRenderer()
    with trio.fail_after(20):
        assert "User: Hi\nAssistant:" == await renderer.render(None, MESSAGES)
        first = renderer._idle[0].process
        assert "<user>Hi" == await renderer.render(GOOD, MESSAGES)
        assert [first] == [r.process for r in renderer._idle]
        await renderer.aclose()
        assert first.returncode is not None


def test_a_renderer_mid_render_exits_when_the_daemon_dies() -> None:
    # A stand-in daemon starts a renderer on an endless render, then dies at once
    parent = r"""
import json, os, struct, subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "supervisor.chat_render_main",
                          str(os.getpid())],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
data = json.dumps({"template": sys.argv[1], "messages": []}).encode()
child.stdin.write(struct.pack(">I", len(data)) + data)
child.stdin.flush()
print(child.pid, flush=True)
"""
    done = subprocess.run([sys.executable, "-c", parent, NESTED_LOOPS], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    renderer = psutil.Process(int(done.stdout))
    renderer.wait(timeout=10)  # psutil.TimeoutExpired if it spins on
