"""Use a trained run: `VQPipeline` from Python, and the commands built on it."""

from pipelines.pipeline import VQPipeline

__all__ = ["VQPipeline"]
