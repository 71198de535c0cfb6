"""What a new user meets first: start-up failures as one clear line, the version, pipes that
close early. The real `modeld` (python -m supervisor), a real daemon where one is needed."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.daemon import ROOT
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_cli import catalog, client_env, modeld
from tests.gguf_factory import write_tiny_llama
from tests.origin import Origin, run_origin_in_thread

EXIT_PIPE_CLOSED = 141


@pytest.fixture
def origin() -> Iterator[Origin]:
    with run_origin_in_thread() as origin:
        yield origin


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "serve", *args], cwd=ROOT,
                          env=client_env(), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def startup_failed(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert ["startup_failed"] == [e["event"] for e in events], proc.stdout
    return events[0]


def test_every_startup_failure_is_one_line_and_an_exit_code(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the storage dir should be")
    env_failure = serve("--storage-dir", str(blocked / "storage"), "--port", "0")
    assert 1 == env_failure.returncode
    assert 1 == len(env_failure.stderr.splitlines()), env_failure.stderr
    assert env_failure.stderr.startswith(f"modeld: cannot use the storage dir {blocked}")
    assert 1 == startup_failed(env_failure)["exit_code"]

    shared = tmp_path / "shared"
    (shared / "models").mkdir(parents=True)
    (shared / "models").chmod(0o777)  # any user could plant links in it
    unsafe = serve("--storage-dir", str(shared), "--port", "0")
    assert 1 == unsafe.returncode
    assert 1 == len(unsafe.stderr.splitlines()), unsafe.stderr
    assert f"{shared}/models is writable by other users (mode 777); run: chmod go-w " \
        f"{shared}/models" in unsafe.stderr

    config = tmp_path / "config.toml"
    config.write_text("[server]\nport = 70000\n[download]\nalow_http = true\n")
    bad = serve("--config", str(config))
    assert 2 == bad.returncode
    assert 1 == len(bad.stderr.splitlines()), bad.stderr
    assert "config.server.port = 70000: must be 1-65535" in bad.stderr
    assert "unknown key config.download.alow_http: did you mean allow_http?" in bad.stderr
    assert 2 == startup_failed(bad)["exit_code"]

    usage = serve("--port", "70000")
    assert 2 == usage.returncode
    assert "70000 is not a port" in usage.stderr
    assert "Traceback" not in usage.stderr + env_failure.stderr + bad.stderr + unsafe.stderr


def test_version_on_the_command_line_and_in_the_server_header(
        make_daemon: DaemonFactory) -> None:
    shown = modeld(None, "--version")
    assert 0 == shown.returncode
    name, version = shown.stdout.split()
    assert "modeld" == name and version[0].isdigit()
    daemon = make_daemon().start()
    assert f"modeld/{version}" == httpx.get(f"{daemon.url}/models").headers["server"]
    assert f"modeld/{version}" == httpx.get(f"{daemon.url}/nope").headers["server"]
    assert 0 == daemon.stop()


def test_pipes_that_close_early_end_quietly(make_daemon: DaemonFactory, origin: Origin,
                                            tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    daemon = make_daemon(catalog(origin, tiny, 20_000)).start()
    for args in (["ls"], ["--json", "ls"], ["--json", "pull", "tiny-cat"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--url", daemon.url, *args], cwd=ROOT,
            env=client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stderr is not None
        if "pull" in args:
            assert proc.stdout.readline()  # following the download: then the reader goes
        proc.stdout.close()  # `| head -1` exiting
        err = proc.stderr.read()
        assert EXIT_PIPE_CLOSED == proc.wait(timeout=60), (args, err)
        assert "" == err, (args, err)
    # The download goes on in the daemon: the pipe closing was no Ctrl-C.
    assert httpx.get(f"{daemon.url}/model/tiny-cat").json()["downloading"]
    assert 0 == daemon.stop()


def test_the_command_line_finds_a_daemon_on_any_port_by_its_storage_dir(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon().start()  # port 0: the kernel picked one
    recorded = json.loads((daemon.storage / "daemon.json").read_text())
    assert daemon.url == recorded["url"]
    # No --url, no MODELD_URL: the config names the storage dir, where the daemon wrote it.
    found = modeld(None, "--config", str(daemon.config_path), "--json", "ls")
    assert 0 == found.returncode, found.stderr
    assert isinstance(json.loads(found.stdout), list)
    assert 0 == daemon.stop()
    assert not (daemon.storage / "daemon.json").exists()
    gone = modeld(None, "--config", str(daemon.config_path), "ls")
    assert 1 == gone.returncode
    assert f"no modeld answering at {daemon.url}" not in gone.stderr  # not a stale address


def test_ls_shows_how_far_downloads_are_and_unload_says_what_it_did(
        make_daemon: DaemonFactory, origin: Origin, tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    daemon = make_daemon(catalog(origin, tiny, 20_000)).start()
    assert 200 == httpx.post(f"{daemon.url}/model/tiny-cat/download").status_code
    for _ in range(600):  # until the first progress past 0 (a 20 KB/s origin: within a second)
        progress = httpx.get(f"{daemon.url}/model/tiny-cat/download/progress").json()
        if progress["status"] == "IN-PROGRESS" and progress["percentage"] > 0:
            break
        time.sleep(0.05)
    listed = modeld(daemon.url, "ls")
    row = next(line for line in listed.stdout.splitlines() if line.startswith("tiny-cat"))
    assert re.search(r"downloading \d+\.\d%", row), row
    as_json = json.loads(modeld(daemon.url, "--json", "ls").stdout)
    assert 0 < next(m for m in as_json if m["id"] == "tiny-cat")["progress"]["percentage"]
    unloaded = modeld(daemon.url, "unload", "big")
    assert (0, "big was not loaded\n") == (unloaded.returncode, unloaded.stdout)
    assert 0 == daemon.stop()


def test_load_says_which_model_it_unloaded_to_make_room(make_daemon: DaemonFactory,
                                                        tmp_path: Path) -> None:
    daemon = make_daemon(runtime={"max_loaded": 1}).start()
    ids = []
    for seed in (1, 2):
        imported = modeld(daemon.url, "import", str(write_tiny_llama(
            tmp_path / f"t{seed}.gguf", seed=seed)), "--name", f"T{seed}")
        assert 0 == imported.returncode, imported.stderr
        ids.append(imported.stdout.strip())
    first = modeld(daemon.url, "load", ids[0])
    assert "to make room" not in first.stdout
    second = modeld(daemon.url, "load", ids[1])
    assert 0 == second.returncode, second.stderr
    assert second.stdout.rstrip().endswith(f"(unloaded {ids[0]} to make room)"), second.stdout
    again = json.loads(modeld(daemon.url, "--json", "load", ids[1]).stdout)
    assert "evicted" not in again  # already loaded: nothing unloaded this time
    shown = json.loads(modeld(daemon.url, "show", ids[1]).stdout)
    assert psutil.Process(shown["pid"]).is_running()  # its worker process
    assert shown["residentBytes"] > 1_000_000
    assert shown["runtime"] in ("llama.cpp", "ctransformers")
    assert "pid" not in json.loads(modeld(daemon.url, "show", ids[0]).stdout)  # unloaded
    assert 0 == daemon.stop()


def test_pull_shows_retries_as_they_happen_and_fails_in_plain_words(
        make_daemon: DaemonFactory) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
        port = closed.getsockname()[1]
        daemon = make_daemon([{"id": "gone", "name": "Gone",
                               "url": f"http://127.0.0.1:{port}/m.gguf"}],
                             download={"retries": 2}).start()
        pulled = modeld(daemon.url, "pull", "gone")
    assert 1 == pulled.returncode
    lines = pulled.stdout.splitlines()
    assert any("retrying (1/2): connection refused" in line for line in lines), lines
    assert any("retrying (2/2): connection refused" in line for line in lines), lines
    assert "could not reach 127.0.0.1: connection refused (3 tries)" in pulled.stderr
    assert "probe" not in pulled.stderr + pulled.stdout
    assert 0 == daemon.stop()
