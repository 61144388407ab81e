"""What users do with trained SAEs: analyze a text's features, compare two sets of texts, steer generation.
Each tool takes an Analyzer (a model and SAEs for some of its layers) and never touches the trainer."""

from .analyze import analyze
from .compare import compare
from .model import Analyzer
from .steer import steer

__all__ = ["Analyzer", "analyze", "compare", "steer"]
