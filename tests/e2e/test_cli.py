"""The `modeld` command line client: the real `python -m supervisor` against a real daemon."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.daemon import ROOT
from tests.e2e.conftest import DaemonFactory
from tests.gguf_factory import gguf_of_size, write_tiny_llama
from tests.origin import Origin, run_origin_in_thread

CLIENT_VARIABLES = ("MODELD_URL", "MODELD_TOKEN", "MODELD_CONFIG")
BIG = gguf_of_size(4_000_000, seed=7)


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARIABLES}
    return {**env, **extra}


def modeld(url: str | None, *args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    head = ["--url", url] if url else []
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *head, *args], cwd=ROOT, env=env or client_env(),
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def start_pull(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor", "--url", url, "pull", *args], cwd=ROOT,
        env=client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def wait_for_progress(proc: subprocess.Popen[str]) -> str:
    """The pull's first progress line: it is following the download."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "%" in line, (line, proc.stderr.read() if proc.stderr else "")
    return line


def wait_for_daemon_bytes(url: str, model_id: str) -> None:
    """Until the daemon's download of `model_id` has bytes (the first progress line a pull
    prints may come before any)."""
    deadline = time.monotonic() + 30
    while (httpx.get(f"{url}/model/{model_id}/download/progress").json().get("bytes") or 0) <= 0:
        assert time.monotonic() < deadline, "no bytes arrived"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def origin() -> Iterator[Origin]:
    with run_origin_in_thread() as origin:
        yield origin


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf")


def catalog(origin: Origin, tiny: Path, throttle: float) -> list[dict[str, object]]:
    origin.add("/tiny.gguf", tiny.read_bytes())
    origin.faults("/tiny.gguf").throttle = throttle
    origin.add("/big.gguf", BIG)
    origin.faults("/big.gguf").throttle = 200_000
    return [
        {"id": "tiny-cat", "name": "Tiny Catalog", "url": origin.url("/tiny.gguf"),
         "size": tiny.stat().st_size},
        {"id": "big", "name": "Big", "url": origin.url("/big.gguf"), "size": len(BIG)},
    ]


def test_ls_show_import_load_unload_rm(make_daemon: DaemonFactory, origin: Origin,
                                       tiny: Path, tmp_path: Path) -> None:
    daemon = make_daemon(catalog(origin, tiny, 300_000)).start()
    url = daemon.url

    listed = modeld(url, "ls")
    assert 0 == listed.returncode, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert ["ID", "NAME", "STATE", "SIZE", "LOADED"] == rows[0]
    assert ["tiny-cat", "Tiny", "Catalog", "absent", "469.8", "KB", "no"] == rows[1]
    assert ["big", "Big", "absent", "4.0", "MB", "no"] == rows[2]

    as_json = modeld(url, "ls", "--json")
    assert 0 == as_json.returncode
    assert ["tiny-cat", "big"] == [m["id"] for m in json.loads(as_json.stdout)]
    assert as_json.stdout == modeld(url, "--json", "ls").stdout

    shown = modeld(url, "show", "tiny-cat")
    assert 0 == shown.returncode
    model = json.loads(shown.stdout)
    assert ("tiny-cat", "Tiny Catalog", False) == (model["id"], model["name"], model["downloaded"])

    imported = modeld(url, "import", str(tiny), "--name", "My Tiny")
    assert 0 == imported.returncode, imported.stderr
    model_id = imported.stdout.strip()
    assert model_id.startswith("my-tiny-")
    assert tiny.read_bytes() == (daemon.storage / "models" / f"{model_id}.gguf").read_bytes()
    rows = [line.split() for line in modeld(url, "ls").stdout.splitlines()]
    assert [model_id, "My", "Tiny", "downloaded", "469.8", "KB", "no"] == rows[-1]
    model = json.loads(modeld(url, "show", model_id).stdout)
    assert (True, False, True) == (model["downloaded"], model["loaded"], model["custom"])
    # The same file again is the same model (by its sha256), unless a copy is asked for.
    again = modeld(url, "import", str(tiny), "--name", "Another Name")
    assert (0, f"{model_id}\n") == (again.returncode, again.stdout)
    copied = modeld(url, "import", str(tiny), "--copy", "--name", "Tiny Copy")
    assert 0 == copied.returncode, copied.stderr
    copy_id = copied.stdout.strip()
    assert copy_id.startswith("tiny-copy-")
    assert 0 == modeld(url, "rm", copy_id).returncode

    loaded = modeld(url, "load", model_id)
    assert 0 == loaded.returncode, loaded.stderr
    assert loaded.stdout.startswith(f"loaded {model_id}")
    assert json.loads(modeld(url, "show", model_id).stdout)["loaded"] is True
    assert "yes" == modeld(url, "ls").stdout.splitlines()[-1].split()[-1]
    unloaded = modeld(url, "unload", model_id)
    assert (0, f"unloaded {model_id}\n") == (unloaded.returncode, unloaded.stdout)
    assert json.loads(modeld(url, "show", model_id).stdout)["loaded"] is False

    removed = modeld(url, "rm", model_id)
    assert (0, f"removed {model_id}\n") == (removed.returncode, removed.stdout)
    gone = modeld(url, "show", model_id)
    assert 1 == gone.returncode
    assert f"modeld: no model with id '{model_id}'" in gone.stderr
    assert not (daemon.storage / "models" / f"{model_id}.gguf").exists()

    # The daemon's own messages, exit code 1, nothing left behind.
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 100)
    refused = modeld(url, "import", str(junk), "--name", "Junk")
    assert 1 == refused.returncode
    assert "not a GGUF file" in refused.stderr
    assert "" == refused.stdout
    assert ["tiny-cat", "big"] == [m["id"] for m in json.loads(modeld(url, "ls", "--json").stdout)]
    not_loadable = modeld(url, "load", "tiny-cat")
    assert 1 == not_loadable.returncode
    assert "modeld: the model is not downloaded; download it first" in not_loadable.stderr
    malformed = modeld(url, "show", "../etc")
    assert 1 == malformed.returncode
    assert "malformed model id" in malformed.stderr
    assert 0 == daemon.stop()


def test_pull_shows_progress_and_publishes_the_file(make_daemon: DaemonFactory, origin: Origin,
                                                    tiny: Path) -> None:
    # About 1.5 s at 300 kB/s.
    daemon = make_daemon(catalog(origin, tiny, 300_000)).start()
    started = time.monotonic()
    pulled = modeld(daemon.url, "pull", "tiny-cat")
    took = time.monotonic() - started
    assert 0 == pulled.returncode, pulled.stderr
    lines = pulled.stdout.splitlines()
    progress = [line for line in lines if line.startswith("tiny-cat ") and "%" in line]
    assert len(progress) >= 3, lines
    assert "100.0%" in progress[-1] and "completed" in progress[-1]
    assert any("KB/s" in line and "ETA" in line for line in progress), lines
    assert "tiny-cat downloaded (469.8 KB)" == lines[-1]
    assert 1.0 < took < 15
    assert tiny.read_bytes() == (daemon.storage / "models" / "tiny-cat.gguf").read_bytes()

    again = modeld(daemon.url, "pull", "tiny-cat")
    assert 0 == again.returncode
    assert "tiny-cat already downloaded (469.8 KB)" == again.stdout.splitlines()[-1]
    as_json = modeld(daemon.url, "pull", "tiny-cat", "--json")
    assert 0 == as_json.returncode
    assert [("COMPLETED", 100)] == [
        (m["status"], m["percentage"]) for m in map(json.loads, as_json.stdout.splitlines())]
    assert "downloaded" == json.loads(modeld(daemon.url, "show", "tiny-cat").stdout)["state"]

    # After a restart the file is still there, and so is its size.
    assert 0 == daemon.stop()
    daemon.start()
    again = modeld(daemon.url, "pull", "tiny-cat")
    assert "tiny-cat already downloaded (469.8 KB)" == again.stdout.splitlines()[-1]
    removed = modeld(daemon.url, "rm", "tiny-cat")
    assert "removed the files of tiny-cat; it stays in the catalog\n" == removed.stdout
    assert not (daemon.storage / "models" / "tiny-cat.gguf").exists()
    assert 0 == daemon.stop()


def test_pull_json_lines(make_daemon: DaemonFactory, origin: Origin, tiny: Path) -> None:
    daemon = make_daemon(catalog(origin, tiny, 1_000_000)).start()
    pulled = modeld(daemon.url, "--json", "pull", "tiny-cat")
    assert 0 == pulled.returncode, pulled.stderr
    messages = [json.loads(line) for line in pulled.stdout.splitlines()]
    assert "COMPLETED" == messages[-1]["status"]
    assert 100 == messages[-1]["percentage"]
    percentages = [m["percentage"] for m in messages]
    assert sorted(percentages) == percentages
    assert 0 == daemon.stop()


def test_pull_of_bytes_that_are_not_a_model_fails(make_daemon: DaemonFactory,
                                                  origin: Origin) -> None:
    origin.add("/noise.gguf", os.urandom(3_000_000))
    daemon = make_daemon([{"id": "noise", "name": "Noise",
                           "url": origin.url("/noise.gguf")}]).start()
    pulled = modeld(daemon.url, "pull", "noise")
    assert 1 == pulled.returncode, pulled.stdout
    assert "modeld: the download of noise failed: " in pulled.stderr
    assert "is not a GGUF file" in pulled.stderr
    assert "noise downloaded" not in pulled.stdout
    model = httpx.get(f"{daemon.url}/model/noise").json()
    assert ("absent", False) == (model["state"], model["downloaded"])
    assert "is not a GGUF file" in model["error"]
    assert [] == [p.name for p in (daemon.storage / "models").glob("noise.gguf*")
                  if not p.name.endswith(".held")]
    assert ["model_file_invalid"] == [e["code"] for e in daemon.events("download_failed")]
    assert 0 == daemon.stop()


def test_cancel_from_another_process_ends_the_pull(make_daemon: DaemonFactory, origin: Origin,
                                                   tiny: Path) -> None:
    daemon = make_daemon(catalog(origin, tiny, 300_000)).start()
    pull = start_pull(daemon.url, "big")
    try:
        wait_for_progress(pull)
        wait_for_daemon_bytes(daemon.url, "big")  # so that the cancel has a partial to keep
        canceled = modeld(daemon.url, "cancel", "big")
        assert 0 == canceled.returncode, canceled.stderr
        assert canceled.stdout.startswith("cancelled the download of big; ")
        _out, err = pull.communicate(timeout=30)
    finally:
        pull.kill()
    assert 1 == pull.returncode
    assert "modeld: the download of big was cancelled; " in err
    assert " kept; `modeld pull big` resumes it" in err
    model = json.loads(modeld(daemon.url, "show", "big").stdout)
    assert ("absent", False) == (model["state"], model["downloading"])
    assert (daemon.storage / "models" / "big.gguf.partial").exists()
    nothing = modeld(daemon.url, "cancel", "big")
    assert (0, "no download of big is running (absent)\n") == (nothing.returncode, nothing.stdout)
    assert 0 == daemon.stop()


def wait_for_bytes(proc: subprocess.Popen[str]) -> None:
    """Read a `pull --json` until the download has bytes."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if (json.loads(line).get("bytes") or 0) > 0:
            return
    raise AssertionError(proc.stderr.read() if proc.stderr else "the pull ended")


def cancel_pull(url: str, model_id: str) -> str:
    """Start a pull, cancel it once bytes arrived; the cancel's output."""
    pull = start_pull(url, model_id, "--json")
    try:
        wait_for_bytes(pull)
        canceled = modeld(url, "cancel", model_id)
        assert 0 == canceled.returncode, canceled.stderr
        pull.communicate(timeout=30)
    finally:
        pull.kill()
    return canceled.stdout


def test_cancel_tells_whether_the_download_can_resume(make_daemon: DaemonFactory,
                                                      origin: Origin) -> None:
    flat = gguf_of_size(4_000_000, seed=8)
    origin.add("/flat.gguf", flat)
    origin.faults("/flat.gguf").ignore_range = True
    origin.add("/big.gguf", BIG)
    for path in ("/flat.gguf", "/big.gguf"):
        origin.faults(path).throttle = 300_000
    daemon = make_daemon([{"id": "flat", "name": "Flat", "url": origin.url("/flat.gguf")},
                          {"id": "big", "name": "Big", "url": origin.url("/big.gguf")}]).start()
    models = daemon.storage / "models"

    # An origin without byte ranges: nothing is kept, and the cancel says so.
    said = cancel_pull(daemon.url, "flat")
    assert said.startswith("cancelled the download of flat; nothing kept to resume from "
                           "(the origin does not serve byte ranges"), said
    assert said.rstrip().endswith("`modeld pull flat` starts over")
    assert [] == [p.name for p in models.glob("flat.gguf*") if not p.name.endswith(".held")]
    assert 0 == httpx.get(f"{daemon.url}/model/flat").json()["partialBytes"]

    # With ranges the partial is kept; when the origin then ignores Range, the download starts
    # over and the log names that as the reason.
    said = cancel_pull(daemon.url, "big")
    assert " kept; `modeld pull big` resumes it" in said, said
    origin.faults("/big.gguf").ignore_range = True
    origin.faults("/big.gguf").throttle = None
    pulled = modeld(daemon.url, "pull", "big")
    assert 0 == pulled.returncode, pulled.stderr
    assert BIG == (models / "big.gguf").read_bytes()
    assert ["the origin does not serve byte ranges, so the partial cannot be resumed"] == [
        e["reason"] for e in daemon.events("download_reset")]
    assert 0 == daemon.stop()


def test_ctrl_c_without_a_terminal_leaves_the_download_running(
    make_daemon: DaemonFactory, origin: Origin, tiny: Path
) -> None:
    daemon = make_daemon(catalog(origin, tiny, 300_000)).start()
    pull = start_pull(daemon.url, "big")
    try:
        wait_for_progress(pull)
        pull.send_signal(signal.SIGINT)
        _out, err = pull.communicate(timeout=30)
    finally:
        pull.kill()
    assert 130 == pull.returncode
    assert "the download of big goes on in modeld" in err
    assert json.loads(modeld(daemon.url, "show", "big").stdout)["downloading"] is True

    # --cancel-on-interrupt: the same Ctrl-C cancels it (the pull joins the running download).
    pull = start_pull(daemon.url, "big", "--cancel-on-interrupt")
    try:
        wait_for_progress(pull)
        pull.send_signal(signal.SIGINT)
        _out, err = pull.communicate(timeout=30)
    finally:
        pull.kill()
    assert 130 == pull.returncode
    assert "interrupted: cancelled the download of big" in err
    model = json.loads(modeld(daemon.url, "show", "big").stdout)
    assert ("absent", True) == (model["state"], model["partialBytes"] > 0)

    # The daemon stops under a pull: the pull says so; the download resumes at the next start.
    pull = start_pull(daemon.url, "big")
    try:
        wait_for_progress(pull)
        assert 0 == daemon.stop()
        _out, err = pull.communicate(timeout=30)
    finally:
        pull.kill()
    assert 1 == pull.returncode
    assert "lost the progress of big before the download ended" in err


def run_in_terminal(argv: list[str], *, interrupt_after: str, answer: bytes,
                    timeout: float = 30) -> tuple[int, str]:
    """Run argv on a pseudo-terminal; press Ctrl-C once `interrupt_after` was shown, then
    answer the question. Returns (exit code, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(ROOT)
        os.execve(argv[0], argv, client_env())
    shown = b""
    deadline = time.monotonic() + timeout
    interrupted = answered = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                shown += data
            if not interrupted and interrupt_after.encode() in shown:
                os.write(fd, b"\x03")  # the terminal turns it into SIGINT
                interrupted = True
            if interrupted and not answered and b"[y/N]" in shown:
                os.write(fd, answer)
                answered = True
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode("utf-8", "replace")


def test_ctrl_c_at_a_terminal_asks_and_cancels(make_daemon: DaemonFactory, origin: Origin,
                                               tiny: Path) -> None:
    daemon = make_daemon(catalog(origin, tiny, 300_000)).start()
    code, shown = run_in_terminal(
        [sys.executable, "-m", "supervisor", "--url", daemon.url, "pull", "big"],
        interrupt_after="ETA", answer=b"y\n",
    )
    assert 130 == code, shown
    assert "Cancel the download of big in modeld? [y/N]" in shown
    assert "interrupted: cancelled the download of big" in shown
    assert "━" in shown  # rich drew a bar
    assert "absent" == json.loads(modeld(daemon.url, "show", "big").stdout)["state"]
    assert 0 == daemon.stop()


def test_a_download_ending_while_the_question_is_open(make_daemon: DaemonFactory,
                                                     origin: Origin, tiny: Path) -> None:
    daemon = make_daemon(catalog(origin, tiny, 300_000)).start()
    code, shown = run_in_terminal(
        [sys.executable, "-m", "supervisor", "--url", daemon.url, "pull", "tiny-cat"],
        interrupt_after="ETA", answer=b"",  # never answered
    )
    assert 0 == code, shown
    lines = shown.replace("\r", "").splitlines()
    asked = next(i for i, line in enumerate(lines) if "[y/N]" in line)
    assert lines[asked].endswith("(no longer needed: the download ended)"), lines[asked:]
    assert any(line.startswith("tiny-cat downloaded") for line in lines[asked + 1:]), lines
    assert 0 == daemon.stop()


def test_no_daemon_answering(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    gguf = str(write_tiny_llama(tmp_path / "t.gguf"))  # (a file that is not GGUF: refused first)
    for args in (["ls"], ["show", "x"], ["pull", "x"], ["import", gguf]):
        proc = modeld(url, *args)
        assert 1 == proc.returncode, args
        assert f"modeld: no modeld answering at {url}: is the service running?\n" == proc.stderr
    # Without --url: $MODELD_URL, then the config's [server] host and port.
    proc = modeld(None, "ls", env=client_env(MODELD_URL=url))
    assert f"no modeld answering at {url}:" in proc.stderr
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\nport = 4321\n')
    proc = modeld(None, "ls", env=client_env(MODELD_CONFIG=str(config)))
    assert "no modeld answering at http://127.0.0.1:4321:" in proc.stderr


def test_token_from_option_environment_or_config(make_daemon: DaemonFactory, origin: Origin,
                                                 tiny: Path, tmp_path: Path) -> None:
    token = "s3cret-cli-token"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    daemon = make_daemon(catalog(origin, tiny, 5_000_000),
                         server={"token_file": str(token_file)}).start()
    refused = modeld(daemon.url, "ls")
    assert 1 == refused.returncode
    assert "Bearer" in refused.stderr and "pass --token or set MODELD_TOKEN" in refused.stderr
    assert 0 == modeld(daemon.url, "--token", token, "ls").returncode
    assert 0 == modeld(daemon.url, "ls", env=client_env(MODELD_TOKEN=token)).returncode
    # The WebSocket progress stream takes it too.
    pulled = modeld(daemon.url, "pull", "tiny-cat", env=client_env(MODELD_TOKEN=token))
    assert 0 == pulled.returncode, pulled.stderr
    # The client reads the daemon's own config: its address and its token file.
    config = tmp_path / "client.toml"
    config.write_text(f'[server]\nport = {daemon.port}\ntoken_file = "{token_file}"\n')
    listed = modeld(None, "--config", str(config), "ls", "--json")
    assert 0 == listed.returncode, listed.stderr
    assert ["tiny-cat", "big"] == [m["id"] for m in json.loads(listed.stdout)]
    assert 0 == daemon.stop()


def test_serve_still_reports_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 1\n")
    proc = modeld(None, "serve", "--config", str(bad))
    assert 2 == proc.returncode
    assert "server" in proc.stderr


def test_import_refuses_an_architecture_no_runtime_runs(tmp_path: Path) -> None:
    # Refused before anything is sent: no daemon needs to answer.
    path = write_tiny_llama(tmp_path / "x.gguf", architecture="notanarch")
    proc = modeld(f"http://127.0.0.1:{free_port()}", "import", str(path))
    assert 1 == proc.returncode
    assert "'notanarch' model" in proc.stderr and "no modeld answering" not in proc.stderr
