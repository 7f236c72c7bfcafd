"""lm-evaluation-harness on saved folders: the real `lm_eval` CLI over every offline task type, the `mea` model,
the compressed cache inside lm-eval's generation, `mea eval` and `mea compare`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_without_mea_hf, tiny_model
from transformers import LlamaForCausalLM

import mea_hf
from mea_hf.cache_mea import CACHE_ARG, cache_nbytes
from mea_hf.hub import save_folder

pytestmark = pytest.mark.slow  # lm-eval runs and subprocesses

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "mea_hf" / "resources" / "lm_eval"
LIMIT = 3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """A compressed MEA folder (1 of 2 KV heads cached) and a Llama folder, each with its tokenizer."""
    root = tmp_path_factory.mktemp("lm_eval_models")
    mea = tiny_model(seed=0, vocab_size=len(tokenizer), num_component_heads=1)
    llama = tiny_model(LlamaForCausalLM, seed=1, vocab_size=len(tokenizer))
    return {
        "mea": save_folder(mea, root / "mea", tokenizer),
        "llama": save_folder(llama, root / "llama", tokenizer),
    }


def _run_lm_eval(command: list[str], cwd: Path, name: str) -> dict:
    """Run an lm_eval-style command line in a subprocess; return its results JSON's "results"."""
    out = cwd / name
    args = [*command, "--tasks", "mea_offline", "--include_path", str(TASKS_DIR), "--device", "cpu",
            "--limit", str(LIMIT), "--output_path", str(out)]  # fmt: skip
    done = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    return json.loads(result_file.read_text())["results"]


def _reference_bits_per_byte(model, tokenizer, texts: list[str]) -> float:
    """Rolling log-likelihood computed directly: each text scored after a BOS token, in one window."""
    total_logprob, total_bytes = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            logprobs = model(ids).logits.float().log_softmax(-1)[0, :-1]
        total_logprob += logprobs.gather(-1, ids[0, 1:, None]).sum().item()
        total_bytes += len(text.encode("utf-8"))
    return -total_logprob / total_bytes / math.log(2)


def test_lm_eval_cli_hf_remote_code_and_mea_model_agree(folders, tokenizer, tmp_path):
    """`lm_eval --model hf ...trust_remote_code=True` and `mea-lm-eval --model mea` (absorb decode,
    static compressed cache) both run all three offline task types, from an unrelated working directory, and agree;
    the perplexity matches the model's own log-likelihood of the held-out chunks."""
    hf = _run_lm_eval(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={folders['mea']},trust_remote_code=True"], tmp_path, "hf")  # fmt: skip
    mea = _run_lm_eval(
        [str(Path(sys.executable).parent / "mea-lm-eval"), "--model", "mea", "--model_args",
         f"pretrained={folders['mea']},kv_decode=absorb,cache_implementation=static"], tmp_path, "mea")  # fmt: skip
    for results in (hf, mea):
        assert set(results) == {"mea_heldout_ppl", "mea_next_line", "mea_complete_line"}
        assert results["mea_heldout_ppl"]["bits_per_byte,none"] > 0
        assert 0 <= results["mea_next_line"]["acc,none"] <= 1
        assert 0 <= results["mea_complete_line"]["exact_match,none"] <= 1
    for task, metric in [("mea_heldout_ppl", "bits_per_byte,none"), ("mea_next_line", "acc,none"),
                         ("mea_next_line", "acc_norm,none"), ("mea_complete_line", "exact_match,none")]:  # fmt: skip
        assert mea[task][metric] == pytest.approx(hf[task][metric], rel=1e-4), (task, metric)

    chunks = [json.loads(line)["text"] for line in (TASKS_DIR / "data/heldout_chunks.jsonl").read_text().splitlines()]
    model = mea_hf.MEAForCausalLM.from_pretrained(folders["mea"]).eval()
    reference = _reference_bits_per_byte(model, tokenizer, chunks[:LIMIT])
    assert hf["mea_heldout_ppl"]["bits_per_byte,none"] == pytest.approx(reference, rel=1e-4)


def _generate_until(lm, contexts: list[str], max_gen_toks: int = 6):
    """lm-eval's generate_until on `contexts`, recording the cache object of every forward call."""
    from lm_eval.api.instance import Instance

    caches = []

    def record(module, args, kwargs):
        caches.append(kwargs.get(CACHE_ARG))

    handle = lm.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        requests = [
            Instance("generate_until", {}, (context, {"until": ["\n\n\n"], "max_gen_toks": max_gen_toks}), index)
            for index, context in enumerate(contexts)
        ]
        texts = lm.generate_until(requests)
    finally:
        handle.remove()
    return texts, caches


def _check_compressed_cache(cache_class: str, heads: list[int], nbytes: int, tokens: int, config) -> None:
    """h' = 1 component head per layer (half of the 2 KV heads) and exactly that many bytes (float32)."""
    assert cache_class in ("MEACache", "MEAStaticCache")
    assert heads == [1] * config.num_hidden_layers
    assert nbytes == 2 * config.num_hidden_layers * 1 * tokens * config.head_dim * 4
    assert (
        nbytes * config.num_key_value_heads
        == 2 * config.num_hidden_layers * config.num_key_value_heads * tokens * config.head_dim * 4
    )


def _greedy_without_cache(model, tokenizer, context: str, new_tokens: int) -> str:
    ids = tokenizer(context, return_tensors="pt", add_special_tokens=False)["input_ids"]
    reference = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=False, pad_token_id=0)
    return tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)


CONTEXT = "def main():\n    return"


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_mea_lm_eval_model_generates_over_the_compressed_cache(folders, tokenizer, cache_implementation):
    """lm-eval's generate_until through the `mea` model decodes over MEACache / MEAStaticCache holding only the
    component heads, and its text equals greedy generate() without any cache."""
    from mea_hf.evaluation.lm_eval_model import MEALM

    lm = MEALM(pretrained=str(folders["mea"]), device="cpu", dtype="float32", kv_decode="absorb",
               cache_implementation=cache_implementation)  # fmt: skip
    texts, caches = _generate_until(lm, [CONTEXT])
    cache = caches[-1]
    assert type(cache) is (mea_hf.MEAStaticCache if cache_implementation == "static" else mea_hf.MEACache)
    tokens = cache.layers[0].keys.shape[2]  # cached positions (allocated length for the static cache)
    heads = [layer.keys.shape[1] for layer in cache.layers]
    _check_compressed_cache(type(cache).__name__, heads, cache_nbytes(cache), tokens, lm.model.config)
    assert texts[0] == _greedy_without_cache(lm.model, tokenizer, CONTEXT, 6)


def test_mea_lm_eval_model_int8_cache(folders):
    """model_args cache_implementation=quantized: lm-eval's generate_until decodes over the int8 MEAQuantizedCache."""
    from mea_hf.evaluation.lm_eval_model import MEALM

    lm = MEALM(pretrained=str(folders["mea"]), device="cpu", dtype="float32", cache_implementation="quantized")
    texts, caches = _generate_until(lm, [CONTEXT])
    assert type(caches[-1]) is mea_hf.MEAQuantizedCache and caches[-1].get_seq_length() > 0
    assert all(layer.quantized["qkeys"].dtype == torch.int8 for layer in caches[-1].layers)
    assert isinstance(texts[0], str)


def test_hf_lm_eval_model_with_remote_code_generates_over_the_compressed_cache(folders, tokenizer):
    """The same through lm-eval's own `hf` model and the folder's remote code, in a process without mea_hf."""
    script = f"""
import json
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
lm = HFLM(pretrained={str(folders["mea"])!r}, trust_remote_code=True, device="cpu", dtype="float32")
caches = []
lm.model.register_forward_pre_hook(lambda module, args, kwargs: caches.append(kwargs[{CACHE_ARG!r}]), with_kwargs=True)
texts = lm.generate_until([Instance("generate_until", {{}}, ({CONTEXT!r}, {{"until": ["\\n\\n\\n"], "max_gen_toks": 6}}), 0)])
cache = caches[-1]
nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
print(json.dumps({{"text": texts[0], "cache": type(cache).__name__, "module": type(lm.model).__module__,
                  "heads": [layer.keys.shape[1] for layer in cache.layers], "nbytes": nbytes,
                  "tokens": cache.layers[0].keys.shape[2]}}))
"""
    result = run_without_mea_hf(script)
    assert result["module"].startswith("transformers_modules")  # the folder's own code, not mea_hf
    model = mea_hf.MEAForCausalLM.from_pretrained(folders["mea"]).eval()
    assert result["cache"] == "MEACache"
    _check_compressed_cache(result["cache"], result["heads"], result["nbytes"], result["tokens"], model.config)
    assert result["text"] == _greedy_without_cache(model, tokenizer, CONTEXT, 6)


def test_evaluate_folder_and_mea_eval_on_llama_and_mea_folders(folders, tmp_path):
    """`evaluate_folder` (the `mea` lm-eval model in-process) on the Llama baseline folder; `mea eval` on the MEA
    folder writes the JSON and adds the headline scores to the folder's model card."""
    from mea_hf.cli import main
    from mea_hf.evaluation.harness import evaluate_folder

    results = evaluate_folder(folders["llama"], ["mea_next_line", "mea_heldout_ppl"], limit=2, batch_size=2)
    assert set(results) == {"mea_next_line", "mea_heldout_ppl"}
    assert 0 <= results["mea_next_line"]["acc"] <= 1 and results["mea_heldout_ppl"]["bits_per_byte"] > 0

    out = tmp_path / "eval.json"
    assert main(["eval", str(folders["mea"]), "--tasks", "mea_next_line,mea_heldout_ppl", "--limit", "2",
                 "--batch-size", "2", "--out", str(out), "--update-card"]) == 0  # fmt: skip
    written = json.loads(out.read_text())
    assert written["limit"] == 2 and set(written["results"]) == {"mea_next_line", "mea_heldout_ppl"}
    card = (folders["mea"] / "README.md").read_text()
    acc = written["results"]["mea_next_line"]["acc"]
    assert f"| mea_next_line acc (limit 2) | {acc:.4g} |" in card


def test_mea_compare_writes_markdown_and_json_with_kv_bytes(folders, tmp_path):
    from mea_hf.cli import main

    out = tmp_path / "compare.md"
    assert main(["compare", str(folders["llama"]), str(folders["mea"]), "--tasks", "mea_next_line",
                 "--limit", "2", "--batch-size", "2", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    # fp16 bytes per token: 2 (K and V) x 2 layers x cached heads x head_dim 16 x 2 bytes
    assert [(row["model"], row["kv_bytes_per_token"]) for row in rows] == [("llama", 256), ("mea", 128)]
    assert all(0 <= row["results"]["mea_next_line"]["acc"] <= 1 for row in rows)
    table = out.read_text().splitlines()
    assert "KV bytes/token" in table[0] and "mea_next_line acc" in table[0]
    assert table[2].startswith("| llama | 256 | 100% |") and table[3].startswith("| mea | 128 | 50% |")


def test_compare_names_rows_by_the_shortest_distinct_path_suffix():
    from mea_hf.evaluation.compare import short_names

    assert short_names(["runs/q/llama/final", "runs/q/mea/final"]) == ["llama/final", "mea/final"]
    assert short_names(["runs/q/llama", "other/mea"]) == ["llama", "mea"]


def test_bad_input_gets_clear_errors(folders, tmp_path, capsys):
    from mea_hf.cli import main
    from mea_hf.evaluation.harness import evaluate_folder
    from mea_hf.evaluation.lm_eval_model import MEALM

    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_folder(tmp_path / "missing", ["mea_next_line"])
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate_folder(folders["mea"], ["no_such_task"])
    with pytest.raises(ValueError, match="kv_decode must be one of"):
        MEALM(pretrained=str(folders["mea"]), device="cpu", kv_decode="fast")
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        MEALM(pretrained=str(folders["mea"]), device="cpu", cache_implementation="sliding_window")
    with pytest.raises(ValueError, match="MEA models only"):
        MEALM(pretrained=str(folders["llama"]), device="cpu", kv_decode="absorb")
    assert main(["eval", str(folders["mea"]), "--limit", "1.5"]) == 2
    assert "--limit must be" in capsys.readouterr().err
    assert main(["compare", str(folders["mea"]), "--out", str(tmp_path / "table.csv")]) == 2
    assert not (tmp_path / "missing").exists()
