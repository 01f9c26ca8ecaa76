"""Optimizers, one per module."""

from asgo.optim._base import mark_as_embedding
from asgo.optim.adafactor import Adafactor
from asgo.optim.asgo import ASGO
from asgo.optim.dasgo import DASGO
from asgo.optim.shampoo import Shampoo

__all__ = ["ASGO", "DASGO", "Adafactor", "Shampoo", "mark_as_embedding"]
