"""Inference pipeline: frame sources, pre/post-processing by task, runner and sinks."""
