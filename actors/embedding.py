"""EmbeddingJob: the embeddings of some texts from a loaded model, as the actor lends it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from actors.errors import InvalidInput, OperationFailed, Unavailable
from actors.worker import Embeddings, WorkerError, WorkerExiting, WorkerRequestError

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
    ) -> None:
        self.model_id = model_id
        self._embed = embed
        self._texts = texts

    async def run(self) -> Embeddings:
        try:
            return await self._embed(self._texts)
        except WorkerRequestError as exc:
            raise InvalidInput(str(exc), code="embedding_refused") from None
        except WorkerExiting:
            raise Unavailable(
                "the model was unloaded while it made embeddings; load it and try again",
                code="model_unloaded",
            ) from None
        except WorkerError as exc:
            log.error("embedding_failed", model=self.model_id, reason=str(exc))
            raise OperationFailed(
                f"the model's worker stopped while making embeddings: {exc}",
                code="worker_exited",
            ) from None
