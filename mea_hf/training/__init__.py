"""Pretraining with accelerate: settings (`settings.py`), model configs (`model_configs.py`), the loop
(`loop.py`), checkpoints (`checkpoints.py`), LR schedules (`schedules.py`) and the LR sweep (`sweep.py`)."""

from .loop import train

__all__ = ["train"]
