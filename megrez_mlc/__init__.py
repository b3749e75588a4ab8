"""megrez-mlc: run Infinigence's Megrez-3B through an MLC-LLM-compatible TVM pipeline."""

from .errors import MegrezError

__version__ = "0.1.0"

__all__ = ["MegrezError", "__version__"]
