"""`mea train` end to end on the tiny configs: CLI, outputs, final folder, exact resume, interruption, schedules."""

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mea_hf.cache_mea import output_cache
from mea_hf.cli import main as cli_main
from mea_hf.data.loading import cached_blocks
from mea_hf.evaluation.loss import mean_token_loss
from mea_hf.training.checkpoints import checkpoint_dirs, read_metrics
from mea_hf.training.loop import train
from mea_hf.training.models import build_model
from mea_hf.training.optim import parameter_groups
from mea_hf.training.schedules import lr_multiplier


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """About 10k tokens of Python source in a few files: small enough that 8 steps cross an epoch boundary."""
    import inspect
    import json as json_module
    import textwrap as textwrap_module

    folder = tmp_path_factory.mktemp("data")
    (folder / "textwrap.txt").write_text(inspect.getsource(textwrap_module)[:9000], encoding="utf-8")
    (folder / "json.txt").write_text(inspect.getsource(json_module)[:9000], encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """72 training blocks of 32 tokens: with batches of 8 an epoch is 9 micro-batches, so 8 steps of 2 cross it."""
    import inspect
    import textwrap as textwrap_module

    folder = tmp_path_factory.mktemp("small-data")
    (folder / "textwrap.txt").write_text(inspect.getsource(textwrap_module)[:4000], encoding="utf-8")
    return folder


def _settings(data_dir, tmp_path, **overrides):
    return {
        "model": "tiny-mea", "data": str(data_dir), "vocab_size": 320, "block_size": 32, "batch_size": 4,
        "grad_accum": 2, "max_steps": 8, "warmup_steps": 2, "lr": 3e-3, "eval_every": 4, "eval_blocks": 4,
        "save_every": 3, "seed": 0, "out": str(tmp_path / "run"), "cache_dir": str(data_dir / "cache"),
        "progress": False, **overrides,
    }  # fmt: skip


def test_cli_trains_tiny_mea_and_final_folder_loads_and_generates(data_dir, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**_settings(data_dir, tmp_path), "max_steps": 100}), encoding="utf-8")
    out = tmp_path / "cli-run"
    assert cli_main(["train", "--config", str(config), "--max-steps", "6", "--out", str(out), "--lr", "2e-3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # the flag beat the file's max_steps
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert steps[1]["lr"] == pytest.approx(2e-3)  # end of warmup = peak LR from the flag
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 6]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000003", "step-00000006"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert summary["tokens_seen"] == 6 * 4 * 2 * 32 and summary["steps"] == 6 and not summary["diverged"]
    assert summary["final_val_loss"] < summary["initial_val_loss"]

    folder = out / "final"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "MEAForCausalLM" and model.config.vocab_size == len(tokenizer)
    assert "Trained with `mea train`" in (folder / "README.md").read_text()
    # The saved weights give the validation loss that training reported on the same blocks.
    blocks = cached_blocks(tokenizer, str(data_dir), "validation", 32, data_dir / "cache")[:4]
    assert mean_token_loss(model, blocks, batch_size=4) == pytest.approx(summary["final_val_loss"], rel=1e-5)
    prompt = tokenizer("def wrap(text", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert generated.sequences.shape == (1, prompt["input_ids"].shape[1] + 5)
    # A plain generate() on the saved folder decodes over the compressed cache (training itself ran uncached).
    assert type(output_cache(generated)).__name__ == "MEACache"


def test_llama_baseline_trains_to_a_llama_folder(data_dir, tmp_path):
    summary = train(_settings(data_dir, tmp_path, model="tiny-llama", max_steps=2, warmup_steps=1, save_every=100))
    model = AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    assert type(model).__name__ == "LlamaForCausalLM" and math.isfinite(summary["final_val_loss"])


def test_interrupted_save_keeps_last_checkpoint_and_resume_is_exact(small_data, tmp_path):
    # 8 steps x 2 micro-batches of 8 blocks over 9 batches per epoch: the epoch ends inside step 5.
    reference = train(_settings(small_data, tmp_path / "a", batch_size=8))
    reference_records = read_metrics(reference["out_dir"])
    assert [r["step"] for r in reference_records if "loss" in r] == list(range(1, 9))

    def crash_while_saving_step_6(event, step=None, **info):
        if event == "checkpoint_saving" and step == 6:
            raise KeyboardInterrupt

    interrupted = _settings(small_data, tmp_path / "b", batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, on_event=crash_while_saving_step_6)
    kept = checkpoint_dirs(interrupted["out"])
    assert [p.name for p in kept] == ["step-00000003"]
    assert json.loads((kept[0] / "trainer_state.json").read_text())["step"] == 3
    assert not (tmp_path / "b" / "run" / "final").exists()
    with pytest.raises(FileExistsError, match="pass resume"):
        train(interrupted)

    def steps_seen(log):
        return lambda event, step=None, **info: log.append(step) if event == "step" else None

    seen = []
    resumed = train({**interrupted, "resume": True}, on_event=steps_seen(seen))
    assert seen == [4, 5, 6, 7, 8]  # from the checkpoint at step 3 (epoch 0, 6 batches in), across the epoch end
    assert read_metrics(resumed["out_dir"]) == reference_records  # same losses, LRs, grad norms, val losses
    assert resumed["final_val_loss"] == reference["final_val_loss"]
    a = load_file(f"{reference['final_dir']}/model.safetensors")
    b = load_file(f"{resumed['final_dir']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Resuming from the reference's step-6 checkpoint (epoch 1, 3 batches in) also reproduces steps 7 and 8.
    copy = tmp_path / "c"
    shutil.copytree(reference["out_dir"], copy)
    shutil.rmtree(copy / "final")
    seen.clear()
    again = train({**interrupted, "out": str(copy), "resume": True}, on_event=steps_seen(seen))
    assert seen == [7, 8] and read_metrics(copy) == reference_records
    assert again["final_val_loss"] == reference["final_val_loss"]

    # A checkpoint written by another number of processes cannot continue exactly: refused, with both counts named.
    other = tmp_path / "d"
    shutil.copytree(reference["out_dir"], other)
    shutil.rmtree(other / "final")
    state_file = checkpoint_dirs(other)[-1] / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "num_processes": 2}))
    with pytest.raises(ValueError, match="written by 2 processes and this run has 1; resume with 2"):
        train({**interrupted, "out": str(other), "resume": True})


def test_parameter_groups_skip_norms_embeddings_and_hlc(tokenizer):
    model = build_model("tiny-mea", tokenizer, block_size=64)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "model.layers.0.mlp.down_proj.weight" in decayed
    assert not any(k in n for n in decayed for k in ("norm", "embed_tokens", "hlc_"))
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.slow
def test_bad_data_and_model_from_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert (
        cli_main(["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 2
    )
    assert f"data file {bad} is not valid UTF-8" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert cli_main(["train", "--model", "huge-mea", "--out", str(tmp_path / "o")]) == 2
    assert "unknown model 'huge-mea'" in capsys.readouterr().err


def test_schedules_warm_up_then_decay_to_min_ratio():
    cosine = lr_multiplier("cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine(10) == pytest.approx(1.0) and cosine(109) == pytest.approx(0.1)
    assert cosine(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    wsd = lr_multiplier("wsd", warmup_steps=10, max_steps=110, min_lr_ratio=0.1, decay_fraction=0.2)
    assert [wsd(s) for s in (9, 10, 50, 87)] == pytest.approx([1.0] * 4)
    assert wsd(88) < 1.0 and wsd(109) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier("step", 1, 10)


def test_sweep_lr_table_plot_divergence_and_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    common = ["sweep-lr", "--out", str(out), "--variants", "llama,mea", "--data", str(data_dir), "--vocab-size", "320",
              "--block-size", "32", "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "3",
              "--eval-blocks", "2", "--cache-dir", str(data_dir / "cache")]  # fmt: skip
    assert cli_main([*common, "--lrs", "1e-3"]) == 0
    first = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["variant"], r["lr"]) for r in first] == [("llama", 1e-3), ("mea", 1e-3)]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}

    assert cli_main([*common, "--lrs", "1e-3,30"]) == 0  # extends the grid; done pairs are skipped
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["variant"], r["lr"]) for r in runs[:2]] == [("llama", 1e-3), ("mea", 1e-3)] and len(runs) == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for run in runs:
        summary = json.loads((out / "runs" / f"{run['variant']}-lr{run['lr']:g}" / "summary.json").read_text())
        assert run["final_val_loss"] == summary["final_val_loss"] and run["diverged"] == summary["diverged"]
        assert run["diverged"] == (run["lr"] == 30)  # LR 30 blows the loss up above its initial value
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == "| variant | lr 0.001 | lr 30 | best |"
    assert "(diverged)" in table and table in capsys.readouterr().out
    assert (out / "loss_vs_lr.png").stat().st_size > 1000
    assert cli_main([*common, "--lrs", "1e-3", "--max-steps", "4"]) == 2
    assert "made with other settings" in capsys.readouterr().err


def test_gradient_checkpointing_matches_and_bf16_stays_close(small_data, tmp_path, monkeypatch):
    base = _settings(small_data, tmp_path / "fp32", max_steps=2, warmup_steps=1, save_every=100, eval_every=100)
    plain = read_metrics(train(base)["out_dir"])
    flags = []

    def on_end(event, model=None, **info):
        if event == "end":
            flags.append(model.is_activation_checkpointing)

    settings = {**base, "out": str(tmp_path / "gc"), "gradient_checkpointing": True}
    checkpointed = read_metrics(train(settings, on_event=on_end)["out_dir"])
    assert flags == [True]
    for a, b in zip(plain, checkpointed, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    monkeypatch.setattr("mea_hf.training.loop.lacks_native_bf16", lambda: True)  # as on an AVX2-only CPU
    with pytest.warns(UserWarning, match="without native bf16 arithmetic"):
        bf16 = read_metrics(train({**base, "out": str(tmp_path / "bf16"), "bf16": True})["out_dir"])
    assert [r["step"] for r in bf16] == [r["step"] for r in plain]
    assert bf16[1]["loss"] == pytest.approx(plain[1]["loss"], rel=0.02) and bf16[1]["loss"] != plain[1]["loss"]


def test_init_from_continues_from_a_saved_folder(small_data, tmp_path):
    first = train(_settings(small_data, tmp_path / "first", max_steps=2, warmup_steps=1, save_every=100))
    settings = _settings(small_data, tmp_path / "second", max_steps=2, warmup_steps=1, save_every=100)
    second = train({**settings, "model": None, "init_from": first["final_dir"]})
    # Same weights, tokenizer and validation blocks: the continued run starts at the first run's final loss.
    assert second["initial_val_loss"] == pytest.approx(first["final_val_loss"], rel=1e-6)
    card = (tmp_path / "second" / "run" / "final" / "README.md").read_text()
    assert "from `final`" in card and str(tmp_path) not in card  # the card names the folder, never a local path
