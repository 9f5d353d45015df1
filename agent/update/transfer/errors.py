"""Pure: what a chunk transfer raises (bad data never retried, transport trouble retried)."""

from __future__ import annotations

from agent.common.errors import BadDataError, TransportError


class RemoteNotFoundError(BadDataError):
    """The registry has no such file. Attributes: ``path``."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class FileTooLargeError(BadDataError):
    """The file is larger than the caller's cap. Attributes: ``path``, ``total``, ``max_length``."""

    def __init__(self, message: str, *, path: str, total: int, max_length: int) -> None:
        super().__init__(message)
        self.path = path
        self.total = total
        self.max_length = max_length


class RequestRefusedError(BadDataError):
    """The registry answered ``bad_request`` (path outside the repository, malformed)."""


class ChunkProtocolError(BadDataError):
    """An answer contradicting its request or earlier answers (size changed, short data)."""


class ChunkTimeoutError(TransportError):
    """A window was not answered after all retries. Attributes: ``path``, ``offset``."""

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class SlowTransferError(TransportError):
    """Fewer bytes than ``min_rate_bps`` allows over the guard span. Attributes: ``path``."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class FetchStoppedError(TransportError):
    """The client's ``stop_event`` was set while a transfer ran (the partial is kept)."""


class PartialMismatch(BadDataError):
    """The registry's size differs from the partial file's sidecar: start over.

    Internal to this package: ``ChunkClient.fetch_file`` catches it and starts over once.
    """
