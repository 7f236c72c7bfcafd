"""Hub-ready folders: Auto-class round trip in-process, trust_remote_code loading in a Python where mea_hf cannot be
imported (what pulling from the Hub does), bf16 loading, folder contents, atomic saving and the push path."""

import ast
import json
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import run_without_mea_hf, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import mea_hf
from mea_hf.hub import push_folder, save_folder

REMOTE_CODE_FILES = {"configuration_mea.py", "modeling_mea.py", "cache_mea.py", "paged_attention.py"}
AUTO_MAP = {
    "AutoConfig": "configuration_mea.MEAConfig",
    "AutoModel": "modeling_mea.MEAModel",
    "AutoModelForCausalLM": "modeling_mea.MEAForCausalLM",
    "AutoModelForSequenceClassification": "modeling_mea.MEAForSequenceClassification",
}


def compressed_model(**overrides):
    """Head norm, random HLC, per-layer component heads [1, 2]: nothing about it is the default. No EOS token, so
    that every way of generating runs the same number of steps."""
    return tiny_model(num_component_heads=[1, 2], eos_token_id=None, **overrides)


INPUT_IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 31], [7, 7, 120, 11, 2, 90, 13, 4]])


def greedy(model):
    return model.generate(INPUT_IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=["scalar", "banded"])
def saved(request, tmp_path_factory, tokenizer):
    """A compressed, perturbed model with kv_decode="absorb" and either HLC form, saved with `save_folder`
    (tokenizer and card)."""
    model = compressed_model(kv_decode="absorb", composition=request.param)
    folder = save_folder(model, tmp_path_factory.mktemp("saved") / "mea", tokenizer, card={"how_made": "test"})
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    return folder, model, logits


def test_folder_holds_safetensors_remote_code_and_auto_map(saved):
    folder, _, _ = saved
    files = {path.name for path in folder.iterdir()}
    assert "model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert REMOTE_CODE_FILES <= files
    assert {"config.json", "generation_config.json", "README.md", "tokenizer.json"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["model_type"] == "mea" and config["num_component_heads"] == [1, 2]
    assert config["architectures"] == ["MEAForCausalLM"]
    # the copied code is the package's code, and imports nothing of mea_hf but its siblings
    package = Path(mea_hf.__file__).parent
    for name in REMOTE_CODE_FILES:
        assert (folder / name).read_text() == (package / name).read_text()
        for node in ast.walk(ast.parse((folder / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in REMOTE_CODE_FILES, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(module.startswith("mea_hf") for module in modules), (name, modules)
    assert "library_name: transformers" in (folder / "README.md").read_text()


def test_auto_classes_round_trip_in_process(saved):
    folder, model, logits = saved
    assert isinstance(AutoConfig.from_pretrained(folder), mea_hf.MEAConfig)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is mea_hf.MEAForCausalLM
    assert loaded.config.kv_decode == "absorb" and loaded.config.num_component_heads == [1, 2]
    with torch.no_grad():
        assert torch.equal(loaded(INPUT_IDS).logits, logits)
    assert torch.equal(greedy(loaded), greedy(model))
    assert type(AutoModel.from_pretrained(folder)) is mea_hf.MEAModel
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert type(classifier) is mea_hf.MEAForSequenceClassification
    assert torch.equal(classifier.model.layers[0].self_attn.hlc_k, model.model.layers[0].self_attn.hlc_k)


def test_bf16_load(saved):
    folder, _, logits = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    with torch.no_grad():
        bf16_logits = loaded(INPUT_IDS).logits
    assert bf16_logits.dtype == torch.bfloat16 and torch.isfinite(bf16_logits).all()
    assert (bf16_logits.float() - logits).abs().max() < 0.1 * logits.abs().max()  # bf16 rounding, not garbage
    assert greedy(loaded).shape == (2, INPUT_IDS.shape[1] + 6)


def remote_script(folder, input_ids: torch.Tensor) -> str:
    """Load `folder` with trust_remote_code, use it every way a Hub user would, print the results as JSON."""
    return textwrap.dedent(
        f"""
        import json, sys
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        folder, input_ids = {str(folder)!r}, torch.tensor({input_ids.tolist()!r})
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(input_ids).logits
        generated = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
        int8 = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              cache_implementation="quantized", return_dict_in_generate=True)
        int8_cache = getattr(int8, "cache", None) or int8.past_key_values  # 5.24 / 5.23 name
        config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
        pages = ContinuousBatchingConfig(num_blocks=32, page_size=16, max_batch_tokens=16)  # not sized from free RAM
        batch = model.generate_batch(inputs=input_ids.tolist(), generation_config=config, continuous_batching_config=pages)
        batch_tokens = [out.generated_tokens for out in sorted(batch.values(), key=lambda out: out.request_id)]
        bf16 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            bf16_logits = bf16(input_ids).logits
        others = [
            auto.from_pretrained(folder, trust_remote_code=True).__class__.__name__
            for auto in (AutoModel, AutoModelForSequenceClassification)
        ]
        model.save_pretrained("resaved")  # fine-tuned and re-shared without mea_hf: the code travels along again
        print(json.dumps({{
            "class": f"{{type(model).__module__}}.{{type(model).__name__}}",
            "other_classes": others,
            "loaded_mea_hf": any(name.split(".")[0] == "mea_hf" for name in sys.modules),
            "logits": logits.tolist(),
            "generated": generated.tolist(),
            "uncached": uncached.tolist(),
            "int8": int8.sequences.tolist(),
            "int8_cache": f"{{type(int8_cache).__module__}}.{{type(int8_cache).__name__}}",
            "batch_tokens": batch_tokens,
            "bf16_dtype": str(bf16_logits.dtype),
            "bf16_finite": bool(torch.isfinite(bf16_logits).all()),
        }}))
        """
    )


@pytest.mark.slow
def test_trust_remote_code_in_a_python_without_mea_hf(saved, tmp_path):
    folder, model, logits = saved
    out = run_without_mea_hf(remote_script(folder, INPUT_IDS), cwd=tmp_path,
                             env={"HF_MODULES_CACHE": str(tmp_path / "modules")})  # fmt: skip
    assert out["class"].startswith("transformers_modules.") and out["class"].endswith("modeling_mea.MEAForCausalLM")
    assert not out["loaded_mea_hf"]
    assert out["other_classes"] == ["MEAModel", "MEAForSequenceClassification"]
    assert torch.equal(torch.tensor(out["logits"]), logits)
    assert out["generated"] == greedy(model).tolist()
    assert out["generated"] == out["uncached"]  # the remote code decodes right over its cache
    assert out["batch_tokens"] == [row[INPUT_IDS.shape[1] :] for row in out["generated"]]
    int8_cache = "MEAQuantizedCache"  # the int8 cache travels with the folder's code (cache_mea.py)
    assert out["int8_cache"].startswith("transformers_modules.") and out["int8_cache"].endswith(int8_cache)
    int8 = model.generate(INPUT_IDS, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="quantized")
    assert out["int8"] == int8.tolist()
    assert out["bf16_dtype"] == "torch.bfloat16" and out["bf16_finite"]
    resaved = tmp_path / "resaved"
    assert REMOTE_CODE_FILES | {"model.safetensors", "config.json"} <= {path.name for path in resaved.iterdir()}
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == AUTO_MAP


class _FailingTokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{half")
        raise RuntimeError("disk full")


def test_save_folder_is_atomic(tmp_path):
    model = compressed_model()
    with pytest.raises(RuntimeError, match="disk full"):
        save_folder(model, tmp_path / "out", tokenizer=_FailingTokenizer())
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    save_folder(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_folder(model, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        save_folder(compressed_model(), tmp_path / "out", tokenizer=_FailingTokenizer(), overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before  # old folder untouched on failure
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_push_folder_uploads_the_save_folder_output(monkeypatch, tmp_path):
    """The Hub is unreachable here, so the two network calls are replaced by recorders; everything else is real.
    The uploaded folder must be the `save_folder` output, and it must load."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["files"] = sorted(path.name for path in Path(folder_path).iterdir())
        with torch.no_grad():
            calls["logits"] = AutoModelForCausalLM.from_pretrained(folder_path)(INPUT_IDS).logits
        return type("CommitInfo", (), {"commit_url": f"https://hf.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = compressed_model()
    url = push_folder(model, "someone/tiny-mea", card={"how_made": "test"})
    assert url == "https://hf.co/someone/tiny-mea/commit/0" and calls["create_repo"] == "someone/tiny-mea"
    expected = sorted(path.name for path in save_folder(model, tmp_path / "saved", card={"how_made": "test"}).iterdir())
    assert calls["files"] == expected
    with torch.no_grad():
        assert torch.equal(calls["logits"], model(INPUT_IDS).logits)


def test_push_folder_offline_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(Exception, match="(?i)offline"):
        push_folder(compressed_model(), "someone/tiny-mea")
    assert list(tmp_path.iterdir()) == []
