"""Measuring models: lm-evaluation-harness runs (`harness.py`, the `mea` lm-eval model in `lm_eval_model.py`),
comparison tables (`compare.py`), held-out loss (`loss.py`), decode speed (`speed.py`)
and how much generated text repeats itself (`repetition.py`)."""

from .harness import OFFLINE_TASKS, evaluate_folder

__all__ = ["OFFLINE_TASKS", "evaluate_folder"]
