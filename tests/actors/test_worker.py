import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio

from actors.worker import (
    GenerateParams,
    Worker,
    WorkerDied,
    WorkerRequestError,
    WorkerStartError,
    open_worker,
)
from tests.gguf_factory import corrupt_header, truncate, write_tiny_llama

LOAD_TIMEOUT = 20.0


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny(models: Path) -> Path:
    return write_tiny_llama(models / "tiny.gguf", seed=1)


@pytest.fixture(scope="session")
def big(models: Path) -> Path:
    return write_tiny_llama(models / "big.gguf", seed=2, extra_bytes=100_000_000)


@pytest.fixture
def no_children_left() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert set() == after - before


async def start(path: Path, context_length: int = 128) -> Worker:
    return await open_worker(
        path,
        model_type="llama",
        context_length=context_length,
        threads=1,
        load_timeout=LOAD_TIMEOUT,
    )


async def collect(worker: Worker, prompt: str, params: GenerateParams) -> str:
    async with worker.generate(prompt, params) as stream:
        return "".join([piece async for piece in stream])


async def test_generate_with_fixed_seed(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        worker = await start(tiny)
        try:
            assert 128 == worker.info.context_length
            assert 260 == worker.info.vocab_size
            assert worker.pid == worker.info.pid
            assert 0 < worker.info.load_seconds < LOAD_TIMEOUT
            params = GenerateParams(max_new_tokens=16, seed=42)
            first = await collect(worker, "Hello", params)
            usage = worker.last_result
            second = await collect(worker, "Hello", params)
            assert first == second
            assert usage is not None and usage == worker.last_result
            assert usage.prompt_tokens > 0
            assert (usage.finish_reason, usage.completion_tokens) in {("length", 16)} or (
                usage.finish_reason == "stop" and usage.completion_tokens < 16
            )
        finally:
            await worker.aclose()


@pytest.mark.parametrize("damage", ["counts", "truncated", "random"])
async def test_damaged_file_fails_to_start(
    tiny: Path, tmp_path: Path, damage: str, no_children_left: None
) -> None:
    with trio.fail_after(30):
        if damage == "counts":
            path = corrupt_header(tiny, dest=tmp_path / "counts.gguf")
        elif damage == "truncated":
            path = truncate(tiny, 0.5, dest=tmp_path / "half.gguf")
        else:
            path = tmp_path / "random.gguf"
            path.write_bytes(b"GGUF" + os.urandom(2048))
        with pytest.raises(WorkerStartError) as caught:
            await start(path)
        assert str(path) in str(caught.value)


async def test_load_timeout_leaves_nothing_behind(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        with pytest.raises(WorkerStartError, match="did not load within"):
            await open_worker(
                tiny, model_type="llama", context_length=128, threads=1, load_timeout=0.01
            )


async def test_cancelled_start_leaves_nothing_behind(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        # Well under a worker's start (a Python process and its imports, >= 20 ms).
        with trio.move_on_after(0.005) as scope:
            await start(tiny)
        assert scope.cancelled_caught


async def test_sigkill_is_seen_by_wait_exited(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        worker = await start(tiny)
        try:
            os.kill(worker.pid, signal.SIGKILL)
            assert -signal.SIGKILL == await worker.wait_exited()
            with pytest.raises(WorkerDied) as caught:
                await collect(worker, "Hello", GenerateParams(max_new_tokens=4))
            assert -signal.SIGKILL == caught.value.returncode
            assert signal.SIGKILL == caught.value.signal
        finally:
            await worker.aclose()


async def test_ctrl_c_at_a_terminal_does_not_stop_a_worker(
        tiny: Path, no_children_left: None) -> None:
    """SIGINT reaches the whole process group at a terminal; the daemon unloads its models
    itself, so a worker ignores it."""
    with trio.fail_after(30):
        worker = await start(tiny)
        try:
            os.kill(worker.pid, signal.SIGINT)
            await trio.sleep(0.2)
            assert worker.returncode is None
            assert await collect(worker, "Hello", GenerateParams(max_new_tokens=4, seed=1))
        finally:
            await worker.aclose()


async def test_emoji_and_cjk_prompts_do_not_crash(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        worker = await start(tiny, context_length=512)
        try:
            long_text = "😀漢字🎉ひらがな" * 500  # 3500 chars, ~11 000 byte-fallback tokens
            with pytest.raises(WorkerRequestError, match="context"):
                await collect(worker, long_text, GenerateParams(max_new_tokens=4))
            text = await collect(worker, "😀漢字🎉" * 20, GenerateParams(max_new_tokens=8, seed=1))
            assert isinstance(text, str)
            assert worker.returncode is None
        finally:
            await worker.aclose()
        assert 0 == worker.returncode


async def test_cancel_mid_stream_then_generate_again(big: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        worker = await start(big, context_length=2048)
        try:
            # ~7 ms per token here: 2000 tokens would take many seconds, so the stop is ours.
            long_run = GenerateParams(max_new_tokens=2000, seed=3)
            async with worker.generate("Once", long_run) as stream:
                async for _ in stream:
                    break
            assert stream.result is not None
            assert "cancelled" == stream.result.finish_reason

            with trio.move_on_after(0.2) as scope:
                await collect(worker, "Once", long_run)
            assert scope.cancelled_caught
            assert worker.last_result is not None
            assert "cancelled" == worker.last_result.finish_reason

            text = await collect(worker, "Again", GenerateParams(max_new_tokens=4, seed=3))
            assert isinstance(text, str)
            assert worker.last_result is not None
            assert worker.last_result.finish_reason in {"length", "stop"}
        finally:
            await worker.aclose()


async def test_closed_stdin_makes_the_worker_exit(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        worker = await start(tiny)
        try:
            # What the child sees when the daemon dies, even by SIGKILL: EOF on its stdin.
            await worker._stdin.aclose()
            assert 0 == await worker.wait_exited()
        finally:
            await worker.aclose()


async def test_aclose_reaps_and_is_idempotent(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        worker = await start(tiny)
        pid = worker.pid
        with trio.CancelScope() as scope:
            scope.cancel()
            await worker.aclose()  # shielded: completes although its caller is cancelled
        assert 0 == worker.returncode
        assert not psutil.pid_exists(pid)
        await worker.aclose()


async def test_aclose_kills_a_worker_that_ignores_exit(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(30):
        worker = await start(tiny)
        os.kill(worker.pid, signal.SIGSTOP)
        await worker.aclose(grace=0.2)
        assert -signal.SIGKILL == worker.returncode


async def test_big_model_memory_is_in_the_worker(
    tiny: Path, big: Path, no_children_left: None
) -> None:
    with trio.fail_after(30):
        small_worker = await start(tiny)
        big_worker = await start(big)
        try:
            small_rss = psutil.Process(small_worker.pid).memory_info().rss
            big_rss = psutil.Process(big_worker.pid).memory_info().rss
            print(f"worker RSS: tiny {small_rss / 1e6:.1f} MB, big {big_rss / 1e6:.1f} MB")
            print(
                f"load: tiny {small_worker.info.load_seconds * 1e3:.1f} ms, "
                f"big {big_worker.info.load_seconds * 1e3:.1f} ms"
            )
            assert big_rss - small_rss > 90_000_000
        finally:
            await small_worker.aclose()
            await big_worker.aclose()
        assert not psutil.pid_exists(big_worker.pid)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncated", "data is not within the file bounds"),
        ("garbage", "failed to read header"),
        ("text", "invalid magic characters"),
    ],
)
async def test_llama_cpp_refusal_names_its_reason(
    tiny: Path, tmp_path: Path, damage: str, reason: str, no_children_left: None
) -> None:
    with trio.fail_after(30):
        if damage == "truncated":
            path = truncate(tiny, 0.5, dest=tmp_path / "half.gguf")
        elif damage == "garbage":
            path = tmp_path / "garbage.gguf"
            path.write_bytes(b"GGUF" + struct.pack("<I", 77) + os.urandom(2048))
        else:
            path = tmp_path / "text.gguf"
            path.write_text("hello, this is not a model\n" * 10)
        with pytest.raises(WorkerStartError) as caught:
            await open_worker(
                path,
                model_type="llama",
                context_length=128,
                threads=1,
                load_timeout=LOAD_TIMEOUT,
                runtime="llama.cpp",
            )
        assert reason in str(caught.value)
        assert "check the input params" not in str(caught.value)


async def test_llama_cpp_serves_two_requests_at_once(tiny: Path, no_children_left: None) -> None:
    with trio.fail_after(60):
        worker = await open_worker(
            tiny,
            model_type="llama",
            context_length=128,
            threads=1,
            load_timeout=LOAD_TIMEOUT,
            runtime="llama.cpp",
            parallel=2,
        )
        try:
            assert ("llama.cpp", 2, 256) == (
                worker.info.runtime,
                worker.info.parallel,
                worker.info.context_length,
            )
            finished: list[int] = []
            started_first = trio.Event()

            async def run(i: int, tokens: int) -> None:
                params = GenerateParams(max_new_tokens=tokens, seed=i, temperature=0.5)
                async with worker.generate("Hello", params) as stream:
                    async for _piece in stream:
                        started_first.set()
                assert stream.result is not None
                finished.append(i)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, 0, 200)
                await started_first.wait()
                nursery.start_soon(run, 1, 4)
            # The short request, started while the long one generated, ended first: it did not
            # wait in a queue behind it (however busy the machine).
            assert [1, 0] == finished
            vectors = (await worker.embed(["a", "b"])).vectors
            assert [64, 64] == [len(v) for v in vectors]
        finally:
            await worker.aclose()
