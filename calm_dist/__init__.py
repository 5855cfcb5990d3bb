"""calm_dist: CALM (Composition to Augment Language Models) at scale."""
from calm_dist.model import CALMModel, compose

__all__ = ["CALMModel", "compose"]
__version__ = "0.1.0"
