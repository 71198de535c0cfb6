"""GenerationStream: the text a loaded model generates for one prompt, as the actor lends it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import TracebackType

import structlog

from actors.errors import InvalidInput, OperationFailed, Unavailable
from actors.ports import TextStream
from actors.worker import GenerationResult, WorkerError, WorkerExiting, WorkerRequestError

log = structlog.get_logger("modeld.actor")


@contextlib.contextmanager
def worker_errors(*, refused: str, unloaded_while: str, died_while: str,
                  log_failure: Callable[[str], None]) -> Iterator[None]:
    """A worker's errors as ModelErrors, the one mapping for generations and embeddings:
    InvalidInput (code `refused`) when the model refuses the request, Unavailable when it is
    unloaded meanwhile, OperationFailed (logged by `log_failure`) when its worker dies."""
    try:
        yield
    except WorkerRequestError as exc:
        raise InvalidInput(str(exc), code=refused) from None
    except WorkerExiting:
        raise Unavailable(
            f"the model was unloaded while it {unloaded_while}; load it and try again",
            code="model_unloaded",
        ) from None
    except WorkerError as exc:
        log_failure(str(exc))
        raise OperationFailed(
            f"the model's worker stopped while {died_while}: {exc}", code="worker_exited"
        ) from None


class GenerationStream:
    """The text a loaded model generates for one prompt: what a `Generate` command answers.

    Use it as ``async with stream: async for piece in stream: ...``. Nothing runs until it is
    iterated; leaving the block early stops the generation in the worker. Errors are
    ModelErrors: InvalidInput when the model refuses the prompt (longer than its context),
    Unavailable when the model is unloaded mid-stream, OperationFailed when its worker dies
    (killed, crashed). `result` holds the token counts once the stream has ended.
    """

    def __init__(self, model_id: str, inner: TextStream,
                 on_close: Callable[[], None] | None = None) -> None:
        self.model_id = model_id
        self._inner = inner
        self._on_close = on_close  # once: the model is no longer in use by this stream

    @property
    def result(self) -> GenerationResult | None:
        return self._inner.result

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> str:
        with worker_errors(
            refused="generation_refused", unloaded_while="generated",
            died_while="generating",
            log_failure=lambda why: log.error("generation_failed", model=self.model_id,
                                              reason=why),
        ):
            return await self._inner.__anext__()

    async def aclose(self) -> None:
        """Stop the generation if it still runs (idempotent; never raises WorkerError)."""
        try:
            await self._inner.aclose()
        finally:
            done, self._on_close = self._on_close, None
            if done is not None:
                done()
