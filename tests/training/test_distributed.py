"""Two real training processes on CPU through `accelerate launch` (MULTI_CPU over gloo): different data, same weights."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow  # subprocesses / real training runs

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_two_processes_see_different_data_and_end_with_identical_weights(tmp_path):
    import textwrap

    data = tmp_path / "data.txt"
    data.write_text(inspect.getsource(textwrap)[:12000], encoding="utf-8")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # --multi_gpu is accelerate's multi-process launcher; with no GPU, `train` makes it MULTI_CPU over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29533", str(WORKER), str(data), str(out), str(tmp_path / "cache")]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["summary"]["num_processes"] == 2 for r in ranks)
    # 4 steps x 2 micro-batches of 2 blocks per rank: 16 blocks per rank, 32 distinct blocks in all.
    blocks = [{tuple(row.tolist()) for batch in r["batches"] for row in batch} for r in ranks]
    assert [len(r["batches"]) for r in ranks] == [8, 8]
    assert not blocks[0] & blocks[1], "both ranks trained on the same block"
    assert ranks[0]["summary"]["tokens_seen"] == 4 * 2 * 2 * 32 * 2
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys() and all(torch.equal(state0[k], state1[k]) for k in state0)
    summary = ranks[0]["summary"]
    assert summary["final_val_loss"] < summary["initial_val_loss"]  # the weights really moved
    saved = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert all(torch.equal(saved[k], state0[k]) for k in saved)
