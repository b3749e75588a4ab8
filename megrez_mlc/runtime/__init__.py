"""Load a converted model and its compiled library; generate text."""

from .engine import Engine, GenerationResult, StreamDelta
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "SamplingParams", "StreamDelta"]
