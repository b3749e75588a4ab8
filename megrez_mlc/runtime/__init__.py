"""Load a converted model and its compiled library; generate text and hold conversations."""

from .chat import ChatMessage, ChatSession
from .engine import Engine, GenerationResult, GenerationStats, PromptTooLong, StreamDelta
from .sampling import SamplingParams
from .sequence import Sequence

__all__ = [
    "ChatMessage",
    "ChatSession",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "PromptTooLong",
    "SamplingParams",
    "Sequence",
    "StreamDelta",
]
