"""Inference backends behind one small interface, the engine cache and precision choice."""

from agent.engine.base import Backend, BackendInfo, TensorSpec

__all__ = ["Backend", "BackendInfo", "TensorSpec"]
