"""calm_dist: CALM (Composition to Augment Language Models) at scale."""
from calm_dist.export import load_exported, save_composition
from calm_dist.model import CALMConfig, CALMForCausalLM, CALMModel, compose

__all__ = ["CALMConfig", "CALMForCausalLM", "CALMModel", "compose", "load_exported", "save_composition"]
__version__ = "0.1.0"
