"""Pure: the base types of every wire message (``WireMessage``, ``BadMessage``).

``WireMessage`` is a strict, frozen pydantic model with a bounded size and ``encode``/``decode``;
every message parsed from untrusted bytes fails with ``BadMessage`` (a ``BadDataError``) and
nothing else when it is oversized, not JSON or does not validate.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.common.errors import BadDataError

MAX_MESSAGE = 64 * 1024  # bytes; far above any real state message, far below broker limits

M = TypeVar("M", bound="WireMessage")


class BadMessage(BadDataError):
    """A payload that does not parse or validate."""


def describe_validation_error(e: ValidationError, limit: int = 3) -> str:
    """One readable line for a pydantic error: ``field 'a.b': message; …``."""
    errors = e.errors(include_url=False, include_input=False)
    parts = [
        f"field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}"
        for err in errors[:limit]
    ]
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts) or str(e)[:300]


class WireMessage(BaseModel):
    """Base of the JSON wire messages: strict schema, bounded size, ``encode``/``decode``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Largest payload sent or accepted; messages that carry data (snapshots) raise it.
    max_bytes: ClassVar[int] = MAX_MESSAGE

    def encode(self) -> bytes:
        """Serialize to compact JSON bytes.

        Raises:
            BadMessage: the message would exceed ``max_bytes`` (receivers would drop it).
        """
        data = self.model_dump_json().encode()
        if len(data) > self.max_bytes:
            raise BadMessage(
                f"{type(self).__name__} encodes to {len(data)} bytes, more than the"
                f" {self.max_bytes} a receiver accepts; not sent"
            )
        return data

    @classmethod
    def decode(cls: type[M], payload: bytes) -> M:
        """Parse and validate untrusted bytes.

        Raises:
            BadMessage: oversized, not UTF-8 JSON, or not matching the schema.
        """
        name = cls.__name__
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise BadMessage(f"{name} payload must be bytes, got {type(payload).__name__}")
        if len(payload) > cls.max_bytes:
            raise BadMessage(
                f"{name} payload is {len(payload)} bytes, more than the {cls.max_bytes} allowed;"
                " message dropped"
            )
        try:
            return cls.model_validate_json(bytes(payload))
        except ValidationError as e:
            raise BadMessage(f"bad {name}: {describe_validation_error(e)}") from e
        except (ValueError, RecursionError) as e:  # defensive: parser limits
            raise BadMessage(f"bad {name}: {type(e).__name__}: {str(e)[:200]}") from e
