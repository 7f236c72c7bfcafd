"""One rank of the 2-process training test (run by tests/test_distributed.py under accelerate launch).

Trains the tiny MEA config with `mea_hf.training.train` and writes, per rank, the blocks it trained on and its final
weights to OUT/rank<k>.pt.
"""

import sys

import torch

from mea_hf.training.loop import train


def main(data: str, out: str, cache: str) -> None:
    record = {"batches": [], "num_processes": None, "rank": None, "state": None}

    def on_event(event, rank, num_processes, **info):
        record["rank"], record["num_processes"] = rank, num_processes
        if event == "batch":
            record["batches"].append(info["input_ids"].clone())
        elif event == "end":
            record["state"] = {k: v.detach().clone() for k, v in info["model"].state_dict().items()}

    settings = {
        "model": "tiny-mea", "data": data, "vocab_size": 320, "block_size": 32, "batch_size": 2, "grad_accum": 2,
        "max_steps": 4, "warmup_steps": 1, "eval_every": 2, "eval_blocks": 2, "save_every": 2, "seed": 0,
        "out": out, "cache_dir": cache, "progress": False,
    }  # fmt: skip
    summary = train(settings, on_event=on_event)
    record["summary"] = summary
    torch.save(record, f"{out}/rank{record['rank']}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
