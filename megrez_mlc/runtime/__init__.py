"""Load a converted model and its compiled library; generate text and hold conversations."""

from .chat import ChatMessage, ChatSession
from .engine import Engine, GenerationResult, GenerationStats, PromptTooLong, StreamDelta
from .grammar import Grammar, GrammarError
from .sampling import SamplingParams
from .sequence import Sequence

__all__ = [
    "ChatMessage",
    "ChatSession",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "Grammar",
    "GrammarError",
    "PromptTooLong",
    "SamplingParams",
    "Sequence",
    "StreamDelta",
]
