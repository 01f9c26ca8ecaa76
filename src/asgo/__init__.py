"""asgo: structured optimizers for training language models."""

from asgo import linalg
from asgo.linalg import inverse_sqrt, orthogonalize
from asgo.optim import ASGO, DASGO, mark_as_embedding

__all__ = ["ASGO", "DASGO", "inverse_sqrt", "linalg", "mark_as_embedding", "orthogonalize"]
__version__ = "0.1.0"
