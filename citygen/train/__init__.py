"""One-block training: ray data, the training loop, checkpoints, metrics and evaluation."""

from ..store.checkpoint import load_checkpoint, save_checkpoint
from ..store.field import load_field
from .evaluate import evaluate
from .trainer import BlockTrainer, TrainResult, train_block

__all__ = ["BlockTrainer", "TrainResult", "evaluate", "load_checkpoint", "load_field", "save_checkpoint",
           "train_block"]
