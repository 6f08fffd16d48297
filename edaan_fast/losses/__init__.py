"""edaan_fast.losses."""

from .metric import CrossEntropyLabelSmooth, QuartetLoss, TripletLoss

__all__ = ["CrossEntropyLabelSmooth", "QuartetLoss", "TripletLoss"]
