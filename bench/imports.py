"""Issue 14's import target: `modeld import` of a 1 GiB GGUF (hash, HTTP upload, header check,
fsync, publish) against `cp` of the same file followed by `sync` of the copy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    ROUNDS,
    WORK,
    GiB,
    Result,
    Row,
    client,
    cpu_ticks,
    delete_model,
    env_int,
    log,
    mbps,
    median,
    random_file,
    rate,
    run_daemon,
    steal_share,
    warm_page_cache,
)
from tests.daemon import ROOT

TARGET = 0.5


def _cp_sync(src: Path, dest: Path) -> float:
    dest.unlink(missing_ok=True)
    os.sync()
    started = time.perf_counter()
    subprocess.run(["cp", str(src), str(dest)], check=True)
    subprocess.run(["sync", str(dest)], check=True)
    seconds = time.perf_counter() - started
    dest.unlink()
    return seconds


def _dd_sync(src: Path, dest: Path) -> float:
    """The floor of a writer that copies through user space (as an upload must): `dd` with
    4 MiB blocks, then `sync` of the copy. `cp` copies inside the kernel (copy_file_range)."""
    dest.unlink(missing_ok=True)
    os.sync()
    started = time.perf_counter()
    subprocess.run(["dd", f"if={src}", f"of={dest}", "bs=4M", "status=none"], check=True)
    subprocess.run(["sync", str(dest)], check=True)
    seconds = time.perf_counter() - started
    dest.unlink()
    return seconds


def _import(url: str, src: Path) -> tuple[float, str]:
    os.sync()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "--url", url, "import", str(src), "--copy"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"modeld import failed ({out.returncode}): {out.stderr}")
    return seconds, out.stdout.strip()


def bench_import() -> Result:
    size = env_int("BENCH_IMPORT_BYTES", GiB)
    src, _digest = random_file("import.gguf", size)
    warm_page_cache(src)
    modeld_s: list[float] = []
    cp_s: list[float] = []
    dd_s: list[float] = []
    steal: list[float] = []
    with run_daemon("import", []) as daemon, client(daemon) as http:
        copy = daemon.storage / "cp-copy.gguf"  # the same file system as the models
        for i in range(ROUNDS):
            cp_s.append(_cp_sync(src, copy))
            dd_s.append(_dd_sync(src, copy))
            before = cpu_ticks()
            seconds, model_id = _import(daemon.url, src)
            steal.append(steal_share(before, cpu_ticks()))
            modeld_s.append(seconds)
            delete_model(http, model_id)
            log(f"round {i + 1}: cp+sync {cp_s[-1]:.2f} s, dd+sync {dd_s[-1]:.2f} s, "
                f"modeld import {seconds:.2f} s (steal {steal[-1]:.0%})")
    ours, ref = rate(size, median(modeld_s)), rate(size, median(cp_s))
    floor = rate(size, median(dd_s))
    ratio = ours / ref
    reference = (f"cp + sync: {mbps(ref)} ({median(cp_s):.2f} s); dd bs=4M + sync: "
                 f"{mbps(floor)} ({median(dd_s):.2f} s)")
    return Result("import", f"import {size / GiB:.0f} GiB", [Row(
        "14. `modeld import` of a GGUF vs `cp` + `sync`",
        f"{mbps(ours)} ({median(modeld_s):.2f} s)", reference,
        f"{ratio:.2f} x cp, {ours / floor:.2f} x dd", f">= {TARGET} x", ratio >= TARGET)],
        details={"modeld_seconds": modeld_s, "cp_sync_seconds": cp_s, "dd_sync_seconds": dd_s,
                 "bytes": size, "import_steal": steal,
                 "how": f"{ROUNDS} alternating rounds, medians; the source file in the page "
                        f"cache; the command line process included (with --copy it does not "
                        f"hash the file first); files in {WORK}"})
