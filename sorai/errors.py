"""Error types users can catch; every message names the bad value and what would be accepted."""

from __future__ import annotations


class SoraiError(Exception):
    """Base class of every error sorai raises on bad input or a bad environment.

    param, when set, names the request field at fault ("tools.0.function.name",
    "response_format.type"); the server reports it as the API error's `param`.
    """

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


class ModelNotFoundError(SoraiError, LookupError):
    """A model name that is neither a known model nor an existing path."""


class ModelFormatError(SoraiError, ValueError):
    """A model file or directory that cannot be read (corrupt, truncated, missing parts)."""


class ContextLengthError(SoraiError, ValueError):
    """A prompt (plus the tokens asked for) that does not fit the model's context window."""


class SamplingError(SoraiError, ValueError):
    """A sampling parameter outside its valid range."""


class ToolError(SoraiError, ValueError):
    """Malformed tools, tool_choice or tool-calling messages."""


class DataError(SoraiError, ValueError):
    """Training data that cannot be used; the message starts with `path:line:` of the bad record."""


class DeviceError(SoraiError, ValueError):
    """A device that is malformed or not present on this machine."""


class HubError(SoraiError, RuntimeError):
    """A model could not be fetched into the cache or failed its checksum."""


class QueueFullError(SoraiError, RuntimeError):
    """The engine's waiting queue is full; retry later (HTTP 429)."""


class EngineDeadError(SoraiError, RuntimeError):
    """The engine stopped after an internal failure and serves no more requests (HTTP 503)."""


class DocumentError(SoraiError, ValueError):
    """A file that cannot be read into a search index (corrupt, not UTF-8, unsupported type)."""


class SearchIndexError(SoraiError, RuntimeError):
    """A search index that cannot be used as asked: missing, not an index, or built with
    another embedding model."""


class ImageError(SoraiError, ValueError):
    """An image that cannot be used: not an image, truncated, too large, or from a source the
    operator does not allow (a path outside the allowed directories, a URL with fetching off)."""
