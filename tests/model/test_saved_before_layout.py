"""Folders saved before the package layout moved still load and decode the same: a tiny compressed model saved by
mea-hf at commit 17875ca (`fixtures/saved_at_17875ca`, with the logits and greedy tokens that code computed; its
copied remote-code files are left out, mea_hf's registered classes load it)."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import mea_hf

FOLDER = Path(__file__).with_name("fixtures") / "saved_at_17875ca"


def test_a_folder_saved_before_the_move_gives_the_same_logits_and_tokens():
    expected = json.loads((FOLDER / "expected.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(FOLDER).eval()
    assert type(model) is mea_hf.MEAForCausalLM and model.config.num_component_heads == [1, 2]
    ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits"]), rtol=0, atol=1e-5)
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.tolist() == expected["greedy"]
