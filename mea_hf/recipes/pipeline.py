"""The steps every compression experiment takes, shared by the quickstart and `benchmarks/bench_compress.py`:
pretrain -> compress -> recover -> measure. Each step reads and writes Hub-ready folders."""

from pathlib import Path

import torch

from ..compress.reduce import describe_compression, reduce_kv_heads
from ..evaluation.loss import mean_token_loss
from ..hub import save_folder
from ..hub.folders import load_folder
from ..training.loop import train


def pretrain(settings: dict) -> dict:
    """`train(settings)`, refusing a diverged run (later steps would measure a broken model)."""
    summary = train(settings)
    if summary["diverged"]:
        raise RuntimeError(
            f"training diverged (validation loss {summary['final_val_loss']}); see {summary['out_dir']}"
        )
    return summary


def compress(source, out, kv_heads: int, method: str, calib_blocks=None, layers=None, how_made: str | None = None,
             composition: str | None = None, progress: bool = False, **calib_options):  # fmt: skip
    """Load the MEA folder `source`, reduce `layers` (all by default) to `kv_heads` cached heads (in `composition`
    form if given; `calib_options`: `reduce_kv_heads`'s calib_* settings), save it
    to `out` with its tokenizer and a card saying how it was made. Returns (folder, model)."""
    model, tokenizer = load_folder(source, "float32")
    reduce_kv_heads(model, kv_heads, layers=layers, method=method, calib_blocks=calib_blocks,
                    composition=composition, progress=progress, **calib_options)  # fmt: skip
    how_made = how_made or describe_compression(
        str(source), method, kv_heads, layers, model.config, calib_options.get("sharpen", 1.0)
    )
    return save_folder(model, out, tokenizer, card={"how_made": how_made}), model


def recover(source, steps: int, lr: float, settings: dict) -> dict:
    """Continued pretraining of the folder `source` for `steps` optimizer steps at peak `lr` (10% warmup)."""
    return pretrain({**settings, "init_from": str(source), "model": None, "max_steps": steps, "lr": lr,
                     "warmup_steps": max(1, steps // 10)})  # fmt: skip


def folder_loss(folder, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats/token) of the saved model in `folder` on token `blocks`."""
    model, _ = load_folder(Path(folder), "float32")
    return mean_token_loss(model, blocks, batch_size=batch_size)
