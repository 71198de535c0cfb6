"""Issue 17's memory target: the estimate a model's view shows once it is loaded
(`memoryEstimate`, from its GGUF header) against its worker's resident memory once it is
loaded and has generated: Gemma 3 270M on llama.cpp, and the tiny test model on both
runtimes. Target: within 20 %."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import WORK, Result, Row, client, log, mb, run_daemon
from bench.llamacpp import gemma_path, place_as
from tests.gguf_factory import write_tiny_llama

TARGET = 0.20


def bench_estimate() -> Result:
    tiny = write_tiny_llama(WORK / "estimate-tiny.gguf", seed=5)
    models = [("gemma", gemma_path(), "llama.cpp"), ("tiny-llamacpp", tiny, "llama.cpp"),
              ("tiny-ctransformers", tiny, "ctransformers")]

    def prepare(storage: Path) -> None:
        for model_id, path, _runtime in models:
            place_as(path, model_id)(storage)

    catalog = [{"id": i, "name": i, "url": "https://example.invalid/unused.gguf", "runtime": r}
               for i, _p, r in models]
    rows: list[Row] = []
    details: dict[str, Any] = {}
    with run_daemon("estimate", catalog, prepare=prepare,
                    runtime={"threads": 1, "max_loaded": 1}) as daemon, client(daemon) as http:
        for model_id, _path, runtime in models:
            loaded = http.post(f"/model/{model_id}/load")
            loaded.raise_for_status()
            estimate = int(loaded.json()["memoryEstimate"])
            http.post("/v1/completions", json={"model": model_id, "prompt": "Hello, my name is",
                                               "max_tokens": 16, "temperature": 0})
            rss = int(http.get(f"/model/{model_id}").json()["residentBytes"])
            http.post(f"/model/{model_id}/unload").raise_for_status()
            error = estimate / rss - 1
            log(f"{model_id}: estimate {mb(estimate)}, resident {mb(rss)} ({error:+.1%})")
            details[model_id] = {"estimate": estimate, "rss": rss, "runtime": runtime}
            rows.append(Row(f"17. memory estimate, {model_id} ({runtime})", mb(estimate),
                            f"worker RSS after a generation: {mb(rss)}", f"{error:+.1%}",
                            f"within {TARGET:.0%}", abs(error) <= TARGET))
    return Result("estimate", "memory estimate vs resident memory", rows, details=details)
