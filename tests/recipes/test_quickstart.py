"""`mea quickstart --smoke`: the full quickstart code path (train MEA and Llama, compress to 50%, recover, lm-eval,
sample over the compressed cache, table, plot, model cards) at toy sizes."""

import json
import sys

import pytest
import yaml
from transformers import AutoConfig

import mea_hf  # noqa: F401
from mea_hf.cli import main

pytestmark = pytest.mark.slow  # subprocesses / real training runs


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    assert main(["quickstart", "--smoke", "--no-progress", "--out", str(out)]) == 0
    return out


def test_smoke_quickstart_writes_table_plot_sample_and_cards(smoke_run):
    out = smoke_run
    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["llama", "mea", "mea-kv50-compressed", "mea-kv50"]

    # The twins have the same sizes; compression halves the cached heads of every MEA layer.
    llama, mea, kv50 = (AutoConfig.from_pretrained(out / name / "final") for name in ("llama", "mea", "mea-kv50"))
    assert (llama.model_type, mea.model_type) == ("llama", "mea")
    assert (llama.hidden_size, llama.num_hidden_layers) == (mea.hidden_size, mea.num_hidden_layers) == (32, 2)
    assert kv50.component_heads_per_layer == [mea.num_key_value_heads // 2] * mea.num_hidden_layers
    assert (
        rows["mea-kv50"]["kv_bytes_per_token"] * 2
        == rows["mea"]["kv_bytes_per_token"]
        == rows["llama"]["kv_bytes_per_token"]
    )
    assert rows["mea-kv50-compressed"]["kv_fraction"] == rows["mea-kv50"]["kv_fraction"] == 0.5

    # Recovery continued from the compressed folder with the same tokenizer; both twins share one tokenizer.
    assert results["training"]["mea-kv50"]["model"] == str(out / "mea-kv50-compressed")
    tokenizers = [
        (out / path / "tokenizer.json").read_text() for path in ("mea/final", "llama/final", "mea-kv50/final")
    ]
    assert tokenizers[0] == tokenizers[1] == tokenizers[2]

    for row in rows.values():
        assert row["val_loss"] > 0 and row["decode_tokens_per_s"] > 0
        assert set(row["results"]) == {"mea_heldout_ppl", "mea_next_line", "mea_complete_line"}
        assert row["results"]["mea_heldout_ppl"]["bits_per_byte"] > 0

    sample = results["sample"]
    assert sample["cache_class"] == "MEACache" and sample["text"].startswith(sample["prompt"])
    assert sample["cached_heads_per_layer"] == kv50.component_heads_per_layer
    assert (
        sample["cache_bytes"] == 2 * sum(kv50.component_heads_per_layer) * sample["cached_tokens"] * kv50.head_dim * 4
    )

    table = (out / "results.md").read_text()
    assert "| mea-kv50 | " in table and "KV bytes/token" in table and "decode_tokens_per_s" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    card = (out / "mea-kv50" / "final" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "transformers"
    assert "| mea_next_line acc |" in card and "| validation loss (quickstart blocks) |" in card
    assert "50.0%" in card


def test_quickstart_refuses_to_overwrite_without_flag(smoke_run, capsys):
    assert main(["quickstart", "--smoke", "--no-progress", "--out", str(smoke_run)]) == 2
    assert "already holds quickstart outputs" in capsys.readouterr().err
    assert (smoke_run / "results.json").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_quickstart_without_lm_eval_refuses_before_touching_the_output(tmp_path, capsys, monkeypatch, overwrite):
    """A bare `pip install .` lacks the `eval` extra: the run is refused up front (one line naming the extra), and an
    earlier run's outputs are not deleted even with --overwrite."""
    earlier = tmp_path / "out" / "results.json"
    earlier.parent.mkdir()
    earlier.write_text("{}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is absent
    arguments = ["quickstart", "--smoke", "--no-progress", "--out", str(earlier.parent)]
    assert main(arguments + ["--overwrite"] * overwrite) == 2
    assert "pip install 'mea-hf[eval]'" in capsys.readouterr().err
    assert earlier.read_text() == "{}" and sorted(p.name for p in earlier.parent.iterdir()) == ["results.json"]
