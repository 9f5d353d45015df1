"""Pure: the API's OpenAPI document as committed in ``docs/openapi.json``.

Regenerate with ``python -m agent.api.openapi docs/openapi.json``; a test fails when the
committed file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def openapi_document() -> dict[str, Any]:
    """The document the server serves at ``/openapi.json`` (independent of the config)."""
    from agent.api.app import create_app

    app = create_app([])
    try:
        return app.openapi()
    finally:
        app.state.streams.close()
        app.state.gate.close()


def render_openapi() -> str:
    """The committed form: indented JSON, sorted keys, trailing newline."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the document to the path given (stdout without one)."""
    args = sys.argv[1:] if argv is None else argv
    text = render_openapi()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
