"""Optimizers, one per module."""

from asgo.optim._base import mark_as_embedding
from asgo.optim.adafactor import Adafactor
from asgo.optim.asgo import ASGO
from asgo.optim.dasgo import DASGO
from asgo.optim.galore import GaLore, GoLore
from asgo.optim.muon import Muon
from asgo.optim.shampoo import Shampoo

__all__ = ["ASGO", "DASGO", "Adafactor", "GaLore", "GoLore", "Muon", "Shampoo", "mark_as_embedding"]
