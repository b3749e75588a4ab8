"""Load a converted model and its compiled library; generate text and hold conversations."""

from .chat import ChatMessage, ChatSession
from .engine import Engine, GenerationResult, GenerationStats, StreamDelta
from .sampling import SamplingParams

__all__ = [
    "ChatMessage",
    "ChatSession",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "SamplingParams",
    "StreamDelta",
]
