"""EmbeddingJob: the embeddings of some texts from a loaded model, as the actor lends it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from actors.generation import worker_errors
from actors.worker import Embeddings

log = structlog.get_logger("modeld.actor")


class EmbeddingJob:
    """What an `Embed` command answers: `await job.run()` asks the model's worker.

    Errors are ModelErrors: InvalidInput when the model refuses (a runtime without embeddings,
    a text longer than its context), Unavailable when the model is unloaded meanwhile,
    OperationFailed when its worker dies.
    """

    def __init__(
        self,
        model_id: str,
        embed: Callable[[list[str]], Awaitable[Embeddings]],
        texts: list[str],
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.model_id = model_id
        self._embed = embed
        self._texts = texts
        self._on_done = on_done  # once: the model is no longer in use by this job

    async def run(self) -> Embeddings:
        with worker_errors(
            refused="embedding_refused", unloaded_while="made embeddings",
            died_while="making embeddings",
            log_failure=lambda why: log.error("embedding_failed", model=self.model_id,
                                              reason=why),
        ):
            try:
                return await self._embed(self._texts)
            finally:
                done, self._on_done = self._on_done, None
                if done is not None:
                    done()
