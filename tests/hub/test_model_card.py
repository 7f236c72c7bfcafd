"""Model cards of saved folders: Hub metadata, MEA settings, provenance, results (and adding results later); the
folder loads with plain transformers in a fresh process that cannot import mea_hf."""


import pytest
import torch
import yaml
from helpers import TINY_DIMS, perturb_, run_without_mea_hf, tiny_mea_config
from transformers import LlamaConfig, LlamaForCausalLM

import mea_hf
from mea_hf.convert import from_llama
from mea_hf.hub import save_folder
from mea_hf.hub.model_card import render_model_card, update_model_card_results


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_compressed_mea_card_has_hub_metadata_settings_and_results():
    config = tiny_mea_config(num_component_heads=[1, 2])
    card = render_model_card(config, how_made="Made by a test.", results={"mea_next_line acc": 0.25, "steps": 7})
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert {"mea-hf", "mea", "text-generation", "kv-cache-compression"} <= set(meta["tags"])
    assert "base_model" not in meta and "Base model: none given" in card  # no base model was named
    # 2 layers, 2 KV heads, head_dim 16: (1 + 2) cached heads x 16 x 2 (K, V) x 2 bytes = 192 of 256 bytes
    assert "| cached component heads per layer (h') | 1, 2 |" in card
    assert "| KV cache vs the uncompressed model | 75.0% (192 vs 256 bytes per token in fp16) |" in card
    assert "Made by a test." in card
    assert "| mea_next_line acc | 0.25 |" in card and "| steps | 7 |" in card
    assert "trust_remote_code=True" in card


def test_converted_folder_card_names_base_model_and_llama_card_has_no_remote_code(tmp_path, tokenizer):
    llama = LlamaForCausalLM(LlamaConfig(**{**TINY_DIMS, "vocab_size": len(tokenizer)}))
    save_folder(llama, tmp_path / "llama", tokenizer, card={"how_made": "Random init."})
    card = (tmp_path / "llama" / "README.md").read_text()
    assert front_matter(card)["tags"] == ["mea-hf", "text-generation", "llama"]
    assert "trust_remote_code=False" in card and "| KV cache vs the uncompressed model | 100.0%" in card

    converted = from_llama(tmp_path / "llama")
    save_folder(converted, tmp_path / "converted", tokenizer, card={"base_model": "meta-llama/Llama-3.2-1B"})
    meta = front_matter((tmp_path / "converted" / "README.md").read_text())
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"


def test_update_model_card_results_merges_rows_and_keeps_the_rest(tmp_path, tokenizer):
    model = mea_hf.MEAForCausalLM(tiny_mea_config(vocab_size=len(tokenizer)))
    folder = save_folder(
        model, tmp_path / "mea", tokenizer, card={"how_made": "Step one.", "results": {"val loss": 3.5}}
    )
    update_model_card_results(folder, {"mea_next_line acc": 0.375})
    update_model_card_results(folder, {"val loss": 3.25})
    card = (folder / "README.md").read_text()
    assert "| val loss | 3.25 |" in card and "| mea_next_line acc | 0.375 |" in card and "3.5 |" not in card
    assert card.count("| metric | value |") == 1 and "Step one." in card
    assert front_matter(card)["library_name"] == "transformers"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary files left

    (folder / "README.md").write_text("# Someone else's card\n")
    update_model_card_results(folder, {"acc": 0.5})
    assert (folder / "README.md").read_text().startswith("# Someone else's card\n\n## Results")
    (folder / "README.md").unlink()
    update_model_card_results(folder, {"acc": 0.5})
    assert front_matter((folder / "README.md").read_text())["tags"][:3] == ["mea-hf", "text-generation", "mea"]


@pytest.mark.slow
def test_saved_folder_loads_with_plain_transformers_without_mea_hf(tmp_path, tokenizer):
    """Fresh process, mea_hf unimportable: the card's own usage snippet runs without prompting, and the model it
    loads (the folder's remote code) gives the same logits and greedy tokens as the model in this process, decoding
    over the folder's own compressed cache class."""
    model = perturb_(mea_hf.MEAForCausalLM(tiny_mea_config(vocab_size=len(tokenizer), num_component_heads=1))).eval()
    folder = save_folder(model, tmp_path / "mea", tokenizer)
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("PATH_OR_REPO", str(folder))
    ids = tokenizer("def main():", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
        generated = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, use_cache=False)
    script = (
        snippet
        + """
import json, sys, torch
with torch.no_grad():
    logits = model(inputs["input_ids"]).logits[0, -1]
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
print(json.dumps({"ids": inputs["input_ids"][0].tolist(), "logits": logits.tolist(), "tokens": out.sequences[0].tolist(),
                  "cache": type(getattr(out, "cache", None) or out.past_key_values).__name__, "module": type(model).__module__,
                  "mea_hf_loaded": "mea_hf" in sys.modules}))
"""
    )
    result = run_without_mea_hf(script)
    assert not result["mea_hf_loaded"] and result["module"].startswith("transformers_modules")
    assert result["ids"] == ids
    torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=1e-5, atol=1e-5)
    assert result["tokens"] == generated[0].tolist()
    assert result["cache"] == "MEACache"


@pytest.mark.slow
def test_blocker_really_blocks_mea_hf():
    with pytest.raises(AssertionError, match="blocked in this process"):
        run_without_mea_hf("import mea_hf")
