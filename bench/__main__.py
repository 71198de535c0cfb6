"""`python -m bench` runs every benchmark; `python -m bench NAME...` runs some. Results go to
bench/results.json (latest per benchmark) and the generated part of BENCHMARKS.md."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable

from bench import backends, cancel, downloads, estimate, imports, live, llamacpp, report, runtime
from bench.common import Result, Row, log, raise_nofile

BENCHMARKS: dict[str, Callable[[], Result]] = {
    "download": downloads.bench_download,
    "segmented": downloads.bench_segmented,
    "import": imports.bench_import,
    "latency": live.bench_latency,
    "fanout": live.bench_fanout,
    "cancel": cancel.bench_cancel,
    "load": runtime.bench_load,
    "memory": runtime.bench_memory,
    "startup": runtime.bench_startup,
    "llamacpp": llamacpp.bench_llamacpp,
    "llamacpp-memory": backends.bench_llamacpp_memory,
    "parallel": backends.bench_parallel,
    "backends": backends.bench_backends,
    "estimate": estimate.bench_estimate,
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    raise_nofile()
    failed = 0
    for name in names:
        log(f"== {name}")
        started = time.perf_counter()
        try:
            result = BENCHMARKS[name]()
        except Exception as exc:
            traceback.print_exc()
            failed += 1
            result = Result(name, name, [Row(name, "error", "-", f"{type(exc).__name__}: {exc}",
                                             "-", None)])
        result.seconds = round(time.perf_counter() - started, 1)
        result.when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        report.save(result)
        log(f"== {name} took {result.seconds} s")
    report.write_markdown()
    print(report.table(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
