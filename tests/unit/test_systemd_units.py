"""The shipped systemd units load cleanly and stay hardened.

``systemd-analyze`` comes with Debian's ``systemd`` package; CI installs it. Neither check needs
systemd to be running as PID 1.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SERVICE = UNITS / "modeld.service"
SOCKET = UNITS / "modeld.socket"
SHIPPED_EXEC_START = "ExecStart=/opt/modeld/bin/modeld "
README = UNITS.parent / "README.md"

# `systemd-analyze security` scores exposure from 0.0 (locked down) to 10.0; --threshold takes it
# times ten. The unit scores 1.2 with systemd 252: what is left is the network access that
# downloads need, the host's root directory, the /proc files that workers read, and setpriority.
EXPOSURE_TARGET = 1.2  # 1.1 before download threads were allowed setpriority (their own nice)
THRESHOLD = round(EXPOSURE_TARGET * 10)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--no-pager", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def installed_modeld() -> str:
    """An executable to stand in for /opt/modeld/bin/modeld: this environment's console script."""
    script = Path(sys.executable).parent / "modeld"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    true = shutil.which("true")
    assert true is not None
    return true


@pytest.fixture
def units(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the units whose ExecStart names an executable that exists here.

    `systemd-analyze verify` fails a unit whose ExecStart binary is missing, and the shipped path
    (/opt/modeld/bin/modeld) is where an admin installs it, not where the tests run.
    """
    text = SERVICE.read_text()
    assert 1 == text.count("\n" + SHIPPED_EXEC_START)
    service = tmp_path / SERVICE.name
    service.write_text(text.replace(SHIPPED_EXEC_START, f"ExecStart={installed_modeld()} "))
    socket = tmp_path / SOCKET.name
    shutil.copyfile(SOCKET, socket)
    return service, socket


def test_units_verify_without_complaint(units: tuple[Path, Path]) -> None:
    result = systemd_analyze("verify", *map(str, units))
    output = result.stdout + result.stderr
    assert 0 == result.returncode, output
    # verify only warns (exit 0) about unknown keys or bad values: none may mention our units.
    complaints = [line for line in output.splitlines() if "modeld." in line]
    assert [] == complaints


def test_service_is_hardened() -> None:
    result = systemd_analyze("security", "--offline=true", f"--threshold={THRESHOLD}", str(SERVICE))
    output = result.stdout + result.stderr
    assert 0 == result.returncode, output
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    assert float(match.group(1)) <= EXPOSURE_TARGET, output


def test_socket_listens_on_loopback_port_1000() -> None:
    lines = SOCKET.read_text().splitlines()
    assert ["ListenStream=127.0.0.1:1000"] == [
        line for line in lines if line.startswith("ListenStream=")
    ]
    assert "Accept=no" in lines


def install_steps() -> list[str]:
    """The shell lines of the README's systemd install block."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Running as a systemd service"):]
    block = section[section.index("```sh\n") + 6:]
    block = block[:block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_units_installed_by_the_readme_steps_verify(tmp_path: Path) -> None:
    """Run the README's steps with every system path moved under tmp_path (the venv and pip
    steps stand in by this environment's modeld), then verify the units as installed."""
    root = tmp_path / "root"
    steps = install_steps()
    assert steps[0] == "sudo /usr/bin/python3 -m venv /opt/modeld"
    assert any(s.startswith("sudo /opt/modeld/bin/pip install") for s in steps)
    assert steps[-2:] == ["sudo systemctl enable --now modeld.socket modeld.service",
                          "modeld ls"]
    assert SERVICE.read_text().count(steps[-2].removeprefix("sudo ")) == 1  # the unit agrees
    (root / "opt/modeld/bin").mkdir(parents=True)
    (root / "opt/modeld/bin/modeld").symlink_to(installed_modeld())
    for step in steps:
        assert step.startswith("sudo ") or step == "modeld ls", step  # root where root is needed
        if "python3 -m venv" in step or "pip install" in step or "systemctl" in step \
                or step == "modeld ls":
            continue
        moved = step.removeprefix("sudo ")
        for system_dir in ("/opt/", "/usr/local/bin/", "/etc/"):
            moved = moved.replace(" " + system_dir, f" {root}{system_dir}")
        (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
        subprocess.run(moved, shell=True, check=True, cwd=UNITS.parent)
    installed = root / "etc/systemd/system"
    service = installed / "modeld.service"
    # ExecStart names /opt/modeld/bin/modeld, where step 1 put it: here, under root.
    text = service.read_text()
    assert 1 == text.count("\n" + SHIPPED_EXEC_START)
    service.write_text(text.replace(SHIPPED_EXEC_START,
                                    f"ExecStart={root}/opt/modeld/bin/modeld "))
    assert (root / "etc/modeld/config.toml").is_file()
    result = systemd_analyze("verify", str(service), str(installed / "modeld.socket"))
    output = result.stdout + result.stderr
    assert 0 == result.returncode, output
    assert [] == [line for line in output.splitlines() if "modeld." in line]
