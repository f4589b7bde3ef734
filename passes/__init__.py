"""Graph -> Graph optimization passes over the pockprop IR, one small pass per file."""
from .dce import eliminate_dead_code

__all__ = ["eliminate_dead_code"]
