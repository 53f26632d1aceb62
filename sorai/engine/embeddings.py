"""The embedding encoder as an engine: a sentence-transformers model loaded on first use and run
on a worker thread of its own, with requests that wait together encoded as one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sorai import hub
from sorai.errors import EngineDeadError, ModelFormatError, SoraiError

if TYPE_CHECKING:
    import torch

    from sorai.model.bert import SentenceEncoder

log = logging.getLogger("sorai.engine")

# Requests waiting together are encoded in one call while they hold at most this many inputs
# (a bigger request still runs, alone); the encoder itself cuts batches to its own size.
MAX_BATCH_INPUTS = 512


def check_embedding_model(name: str) -> None:
    """Fail fast (SoraiError) on an embedding model argument that cannot work: a chat model's
    name, or a path that is not a sentence-transformers directory. Nothing is pulled."""
    kind = hub.kind_of(name)
    if kind == hub.EMBEDDING:
        return
    if kind is not None:
        raise SoraiError(
            f"{name!r} is a {kind} model, not an embedding model; known embedding models: "
            + ", ".join(n for n, s in sorted(hub.KNOWN_MODELS.items()) if s.kind == hub.EMBEDDING)
        )
    path = Path(os.path.expanduser(name))
    if not path.exists():
        raise SoraiError(
            f"embedding model {name!r} is neither a known embedding model nor a path to a "
            f"sentence-transformers directory{hub.did_you_mean(name)}"
        )
    from sorai.model.bert import SentenceEncoderConfig

    SentenceEncoderConfig.from_dir(path)


@dataclass(frozen=True)
class Embeddings:
    """One request's answer: a float32 [inputs, dimension] tensor on the CPU, and the tokens
    each input took (after truncation to the model's limit)."""

    vectors: torch.Tensor
    token_counts: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass
class _Job:
    # None: load the model only.
    inputs: Sequence[str] | Sequence[Sequence[int]] | None
    dimensions: int | None
    future: Future

    @property
    def size(self) -> int:
        return len(self.inputs or ())


class EmbeddingEngine:
    """The embedding model `name` (a known model or a path, as the user gave it): loaded on
    first use, run on one worker thread, so an event loop never waits for it. device and dtype
    go to SentenceEncoder.from_dir (None: the GPU if any, and the fastest dtype there)."""

    def __init__(
        self,
        name: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.name = name
        self._device = device
        self._dtype = dtype
        self._encoder: SentenceEncoder | None = None
        self._max_seq_length: int | None = None
        self._load_lock = threading.Lock()
        self._pending: deque[_Job] = deque()
        self._pending_lock = threading.Lock()
        self._closed = False
        # One worker: batches run one at a time, in arrival order.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sorai-embeddings")

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def max_seq_length(self) -> int | None:
        """The model's input limit when its files are at hand (nothing is pulled for it)."""
        if self._max_seq_length is None:
            from sorai.model.bert import SentenceEncoderConfig

            source = hub.KNOWN_MODELS.get(self.name)
            # Only small JSON files are read (no checksum): callers may be on an event loop.
            if source is not None:
                path = hub.model_dir(self.name) / source.filename
            else:
                path = Path(self.name).expanduser()
            with contextlib.suppress(SoraiError, OSError):
                self._max_seq_length = SentenceEncoderConfig.from_dir(path).max_seq_length
        return self._max_seq_length

    def encoder(self) -> SentenceEncoder:
        """The loaded model (loading it now, pulling a known model on first use).

        A model that cannot be loaded raises a SoraiError (HubError, ModelNotFoundError,
        ModelFormatError for a directory that cannot be read), and the next call tries again.
        """
        with self._load_lock:
            if self._encoder is None:
                from sorai.model.bert import SentenceEncoder

                log.info("loading embedding model %s", self.name)
                try:
                    path = hub.resolve(self.name, progress=log.info)
                    encoder = SentenceEncoder.from_dir(path, self._device, self._dtype)
                except OSError as e:
                    raise ModelFormatError(str(e)) from e
                log.info("embedding model %s: %s on %s", self.name, encoder.dtype, encoder.device)
                self._encoder = encoder
                self._max_seq_length = self._encoder.max_seq_length
            return self._encoder

    async def load(self) -> None:
        """Load the model on the worker thread unless it is loaded (see encoder())."""
        if not self.loaded:
            await self._submit(None, None)

    async def embed(
        self, inputs: Sequence[str] | Sequence[Sequence[int]], dimensions: int | None = None
    ) -> Embeddings:
        """Embeddings of `inputs`: all texts, or all token-id lists (used as given, cut to the
        model's limit). The model loads first if needed.

        `dimensions` other than the model's own size, and token ids outside its vocabulary,
        raise SoraiError. Cancelling the call drops a request that has not started encoding.
        """
        result = await self._submit(list(inputs), dimensions)
        assert result is not None
        return result

    async def _submit(
        self, inputs: Sequence[str] | Sequence[Sequence[int]] | None, dimensions: int | None
    ) -> Embeddings | None:
        job = _Job(inputs, dimensions, Future())
        with self._pending_lock:
            if self._closed:
                raise EngineDeadError(f"the embedding engine for {self.name!r} is closed")
            self._pending.append(job)
            self._worker.submit(self._drain)
        # Cancelling the awaiting task cancels job.future, which the worker then skips.
        return await asyncio.wrap_future(job.future)

    def _take(self) -> list[_Job]:
        """The jobs waiting now, oldest first, up to MAX_BATCH_INPUTS inputs (at least one)."""
        jobs: list[_Job] = []
        with self._pending_lock:
            while self._pending:
                job = self._pending[0]
                if jobs and sum(j.size for j in jobs) + job.size > MAX_BATCH_INPUTS:
                    break
                self._pending.popleft()
                if job.future.set_running_or_notify_cancel():
                    jobs.append(job)
        return jobs

    def _drain(self) -> None:
        # One _drain is queued per job, so a job taken by an earlier batch leaves nothing here.
        jobs = self._take()
        if not jobs:
            return
        try:
            encoder = self.encoder()
        except BaseException as e:
            for job in jobs:
                job.future.set_exception(e)
            return
        batch: list[tuple[_Job, list[list[int]]]] = []
        for job in jobs:
            try:
                ids = _token_ids(encoder, self.name, job)
            except BaseException as e:
                job.future.set_exception(e)
                continue
            if ids is None:
                job.future.set_result(None)
            else:
                batch.append((job, ids))
        if not batch:
            return
        try:
            # One call for every request: the encoder sorts all their inputs into length
            # buckets together, and hands the vectors back in this order.
            vectors = encoder.encode_ids([seq for _, ids in batch for seq in ids])
        except BaseException as e:
            for job, _ in batch:
                job.future.set_exception(e)
            return
        start = 0
        for job, ids in batch:
            job.future.set_result(
                Embeddings(vectors[start : start + len(ids)], [len(seq) for seq in ids])
            )
            start += len(ids)

    def close(self) -> None:
        """Refuse new requests and cancel the waiting ones; a batch being encoded finishes."""
        with self._pending_lock:
            self._closed = True
            while self._pending:
                self._pending.popleft().future.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)


def _token_ids(encoder: SentenceEncoder, name: str, job: _Job) -> list[list[int]] | None:
    """The token ids `job` asks to embed, cut to the model's limit (None for a load job)."""
    if job.inputs is None:
        return None
    if job.dimensions is not None and job.dimensions != encoder.dimension:
        raise SoraiError(
            f"dimensions is not supported by {name!r}: its embeddings have "
            f"{encoder.dimension} dimensions, got {job.dimensions}",
            param="dimensions",
        )
    if not job.inputs:
        raise SoraiError("inputs must hold at least one text or token-id list, got none")
    texts = sum(isinstance(item, str) for item in job.inputs)
    if texts == len(job.inputs):
        return encoder.tokenize(job.inputs)  # type: ignore[arg-type]
    if texts:
        raise SoraiError(
            f"inputs must be all texts or all token-id lists, got {texts} texts among "
            f"{len(job.inputs)} inputs"
        )
    ids = [list(seq[: encoder.max_seq_length]) for seq in job.inputs]
    vocab = encoder.vocab_size
    for i, seq in enumerate(ids):
        bad = next((t for t in seq if not 0 <= t < vocab), None)
        if bad is not None:
            raise SoraiError(f"input[{i}]: token ids must be in [0, {vocab}), got {bad}")
        if not seq:
            raise SoraiError(f"input[{i}] is an empty list; every input needs tokens")
    return ids
