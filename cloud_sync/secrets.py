"""Pure + thin edge: where cloud services find their database URL, and how it is printed.

A PostgreSQL URL carries a password. On a command line it is readable by every local user
(``/proc/PID/cmdline``) and systemd logs it; printed at start-up it lands in the journal. So:

- ``resolve_db_url`` takes ``--db`` when given, else the systemd credential ``db-url``
  (``LoadCredential=db-url:/etc/edgefleet/…`` in the unit; the file is readable only by the
  service, even under ``DynamicUser=``), else ``EDGEFLEET_DB``, else the default;
- ``redact_url`` is what every message shows instead: ``postgresql+psycopg://fleet:***@db/…``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DB_CREDENTIAL = "db-url"


def resolve_db_url(arg: str | None, default: str, env: Mapping[str, str] | None = None) -> str:
    """The database URL to open (read once, at start-up).

    Raises:
        OSError: the credentials directory names a ``db-url`` that cannot be read.
    """
    if arg:
        return arg
    env = os.environ if env is None else env
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = Path(creds) / DB_CREDENTIAL
        if path.exists():
            return path.read_text(encoding="utf-8").strip()
    return env.get("EDGEFLEET_DB") or default


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (anything unparsable is shown as is)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return url
