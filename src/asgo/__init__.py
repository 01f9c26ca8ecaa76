"""asgo: structured optimizers for training language models."""

from asgo import linalg
from asgo.linalg import inverse_sqrt, orthogonalize
from asgo.optim import ASGO, DASGO, Adafactor, GaLore, GoLore, Muon, Shampoo, mark_as_embedding
from asgo.routing import RoutedOptimizer, build_optimizer

__all__ = [
    "ASGO", "DASGO", "Adafactor", "GaLore", "GoLore", "Muon", "RoutedOptimizer", "Shampoo",
    "build_optimizer", "inverse_sqrt", "linalg", "mark_as_embedding", "orthogonalize",
]
__version__ = "0.1.0"
