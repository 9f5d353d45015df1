"""Pure: the two roots of every error the agent raises, with typed attributes.

``BadDataError`` is for input that must never be retried as is (a broken model, a bad
signature, a malformed message, a config error). ``TransportError`` is for trouble that may go
away on retry (broker gone, camera unplugged, chunk timeout). Foreign exceptions are wrapped at
the edge with ``raise ... from e`` so callers need catch only these.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of all edgefleet errors."""


class BadDataError(EdgefleetError):
    """Input that is wrong and stays wrong: do not retry it unchanged."""


class TransportError(EdgefleetError):
    """Trouble reaching something; retrying later may succeed."""


class ConfigError(BadDataError):
    """A config or profile file that does not validate.

    Attributes:
        path: the file that failed (or ``"<env>"`` for environment overrides).
        field: dotted name of the offending field, when known.
    """

    def __init__(self, message: str, *, path: str = "", field: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class ModelError(BadDataError):
    """A model that cannot be loaded, built or run.

    Attributes:
        model: the model path or ``name@version``.
        reason: short machine-friendly cause (``"load"``, ``"shape"``, ``"nan"``, ...).
    """

    def __init__(self, message: str, *, model: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.model = model
        self.reason = reason


class EngineBuildError(ModelError):
    """An engine build that failed, crashed or ran out of time in its child process."""


class SourceError(TransportError):
    """A video source that could not be opened or stopped delivering frames.

    Attributes:
        source: the source spec as configured (credentials removed).
    """

    def __init__(self, message: str, *, source: str = "") -> None:
        super().__init__(message)
        self.source = source
