"""The local inference API: ``create_app`` (FastAPI over the agent's pipelines) and
``ApiServer`` (uvicorn on a thread). See README "Local inference API"."""

from __future__ import annotations

from agent.api.app import create_app
from agent.api.server import ApiServer

__all__ = ["ApiServer", "create_app"]
