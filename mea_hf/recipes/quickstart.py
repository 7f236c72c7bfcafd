"""`mea quickstart`: the main job end to end, offline, on the built-in corpus.

    mea quickstart                     # full run (about 10 minutes on 2 CPU cores), writes runs/quickstart/
    mea quickstart --smoke --out DIR   # the same code path at toy sizes (under a minute), for CI

Stages, under one progress bar:
 1. train a small MEA model (`tiny-mea`) and its Llama twin (`tiny-llama`: same sizes, same tokenizer and data);
 2. compress the MEA KV cache to 50% (h' = h/2 component heads in every layer, method "calib");
 3. recover briefly (continued training from the compressed folder);
 4. measure every model the same way: validation loss on the same held-out blocks, the offline lm-eval tasks,
    KV-cache bytes per token and greedy decode tokens/s over each model's default cache;
 5. generate a sample with the compressed cache; write results.json, results.md and results.png, print the table,
    and add the scores to each model folder's README.md.
"""

import json
import logging
import math
import shutil
import time
from pathlib import Path

from ..evaluation.harness import require_lm_eval
from ..hub.folders import check_model_folder
from ..utils.atomic import atomic_write_json, atomic_write_text
from . import pipeline

SAMPLE_PROMPT = "import os\n\n\ndef "
# Everything that differs between the full run and the CI smoke run.
PRESETS = {
    "full": {
        "mea_model": "tiny-mea",
        "llama_model": "tiny-llama",
        "model_overrides": {},
        "data": "builtin",
        "vocab_size": 4096,
        "block_size": 256,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup_steps": 30,
        "train_steps": 1500,
        "recover_steps": 75,
        "recover_lr": 1e-4,  # 1e-3 made the calib-compressed start worse (val loss 3.672 -> 3.723); 3e-4: 3.653
        "eval_every": 250,
        "eval_blocks": 64,
        "calib_blocks": 32,
        # This toy model's calib start is far off (val loss 4.46 against 3.62 uncompressed), so it wants larger and
        # more steps than the default tuned on SmolLM2-135M: 3.658 with these (14 s), 3.817 with the default.
        "calib_steps": 150,
        "calib_lr": 0.06,
        "calib_q_scale": 1.0,  # the q/o step it was tuned with (the default for h/2 is 0.5, tuned on SmolLM2-135M)
        "eval_limit": None,
        "decode_context": 512,
        "decode_tokens": 64,
        "sample_tokens": 48,
    },
    "smoke": {
        "mea_model": "tiny-mea",
        "llama_model": "tiny-llama",
        "model_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64},
        "data": "smoke",  # a few built-in documents written to OUT/data/smoke.jsonl
        "vocab_size": 384,
        "block_size": 32,
        "batch_size": 4,
        "lr": 2e-3,
        "warmup_steps": 1,
        "train_steps": 8,  # 4 left the loss within 0.02 of its start: too close to call a fall
        "recover_steps": 2,
        "recover_lr": 1e-3,
        "eval_every": 8,
        "eval_blocks": 4,
        "calib_blocks": 4,
        "calib_steps": 150,
        "calib_lr": 0.06,
        "calib_q_scale": 1.0,
        "eval_limit": 2,
        "decode_context": 16,
        "decode_tokens": 4,
        "sample_tokens": 8,
    },
}
# Output folders this command creates under OUT (so --overwrite removes only these).
OUTPUTS = ("configs", "data", "cache", "mea", "llama", "mea-kv50-compressed", "mea-kv50",
           "results.json", "results.md", "results.png")  # fmt: skip


def _model_config(name: str, overrides: dict, out: Path) -> str:
    """The model setting for `mea train`: the named config, or a copy of it with `overrides` written under OUT."""
    from ..training.models import model_config_path

    if not overrides:
        return name
    fields = json.loads(model_config_path(name).read_text(encoding="utf-8"))
    path = out / "configs" / f"{name}.json"
    atomic_write_json(path, {**fields, **overrides})
    return str(path)


def _smoke_data(out: Path) -> str:
    """A few built-in corpus documents (first 3000 characters each) as a small JSONL file."""
    from ..data.corpus import builtin_corpus

    documents = builtin_corpus()["train"][:24]
    path = out / "data" / "smoke.jsonl"
    atomic_write_text(path, "".join(json.dumps({"text": text[:3000]}) + "\n" for text in documents))
    return str(path)


def _prepare_out(out: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds quickstart outputs ({', '.join(existing)}); pass --overwrite or --out."
        )
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


class Quickstart:
    """One quickstart run: `run()` executes the stages in order and returns the results dict."""

    def __init__(self, out, preset: str = "full", progress: bool = True):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        require_lm_eval()  # the measure stage runs lm-eval: refuse now, not after training
        self.out, self.preset, self.settings, self.progress = Path(out), preset, PRESETS[preset], progress
        self.summaries: dict[str, dict] = {}
        self.folders: dict[str, Path] = {}
        self.rows: list[dict] = []
        self.sample: dict = {}
        self.stage_seconds: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------- settings
    def _train_settings(self, **settings) -> dict:
        s = self.settings
        common = {
            "data": self.data, "vocab_size": s["vocab_size"], "block_size": s["block_size"],
            "batch_size": s["batch_size"], "eval_every": s["eval_every"], "eval_blocks": s["eval_blocks"],
            "save_every": 10**9, "seed": 0, "progress": self.progress, "cache_dir": self.cache_dir,
        }  # fmt: skip
        return {**common, **settings}

    def _record(self, name: str, summary: dict) -> None:
        self.summaries[name] = summary
        self.folders[name] = Path(summary["final_dir"])

    # ---------------------------------------------------------------------------------------------- stages
    def prepare(self) -> None:
        s = self.settings
        self.data = _smoke_data(self.out) if s["data"] == "smoke" else s["data"]
        self.cache_dir = str(self.out / "cache") if self.preset == "smoke" else None  # full: the shared default cache
        self.mea_model = _model_config(s["mea_model"], s["model_overrides"], self.out)
        self.llama_model = _model_config(s["llama_model"], s["model_overrides"], self.out)

    def train_mea(self) -> None:
        s = self.settings
        self._record("mea", pipeline.pretrain(self._train_settings(
            out=str(self.out / "mea"), model=self.mea_model, max_steps=s["train_steps"], lr=s["lr"],
            warmup_steps=s["warmup_steps"])))  # fmt: skip

    def train_llama(self) -> None:
        s = self.settings
        self._record("llama", pipeline.pretrain(self._train_settings(
            out=str(self.out / "llama"), model=self.llama_model, tokenizer=str(self.folders["mea"]),
            max_steps=s["train_steps"], lr=s["lr"], warmup_steps=s["warmup_steps"])))  # fmt: skip

    def compress(self) -> None:
        from transformers import AutoTokenizer

        from ..data.loading import cached_blocks

        s = self.settings
        source = self.folders["mea"]
        tokenizer = AutoTokenizer.from_pretrained(source)
        calib = cached_blocks(tokenizer, self.data, "train", s["block_size"], self.cache_dir)[: s["calib_blocks"]]
        kv_heads = check_model_folder(source).num_key_value_heads
        heads = kv_heads // 2
        how_made = (
            f"`{source}` with its KV cache compressed to {heads} of {kv_heads} heads in every layer by "
            f'`mea_hf.compress.reduce_kv_heads(method="calib")` on {len(calib)} training blocks of '
            f"{s['block_size']} tokens ({s['calib_steps']} refinement steps, calib_lr {s['calib_lr']}, calib_q_scale "
            f"{s['calib_q_scale']}; "
            "mea quickstart); no training after compression."
        )
        folder, _ = pipeline.compress(
            source, self.out / "mea-kv50-compressed", heads, "calib", calib, how_made=how_made,
            calib_steps=s["calib_steps"], calib_lr=s["calib_lr"], calib_q_scale=s["calib_q_scale"],
        )  # fmt: skip
        self.folders["mea-kv50-compressed"] = folder

    def recover(self) -> None:
        s = self.settings
        summary = pipeline.recover(self.folders["mea-kv50-compressed"], s["recover_steps"], s["recover_lr"],
                                   self._train_settings(out=str(self.out / "mea-kv50")))  # fmt: skip
        self._record("mea-kv50", summary)

    def measure(self) -> None:
        """Validation loss, lm-eval scores, KV bytes/token and decode speed of every model, measured the same way."""
        from ..evaluation.compare import folder_memory_row
        from ..evaluation.harness import OFFLINE_TASKS, evaluate_folder

        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        for name in ("llama", "mea", "mea-kv50-compressed", "mea-kv50"):
            folder = self.folders[name]
            row = folder_memory_row(folder)
            row["model"] = name
            row.update(self._loss_and_speed(folder))
            row["results"] = evaluate_folder(folder, OFFLINE_TASKS, self.settings["eval_limit"])
            self.rows.append(row)

    def _loss_and_speed(self, folder: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..data.loading import cached_blocks
        from ..evaluation.loss import mean_token_loss
        from ..evaluation.speed import decode_tokens_per_second

        s = self.settings
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        blocks = cached_blocks(tokenizer, self.data, "validation", s["block_size"], self.cache_dir)[: s["eval_blocks"]]
        speeds = [decode_tokens_per_second(model, s["decode_context"], s["decode_tokens"]) for _ in range(3)]
        return {
            "val_loss": mean_token_loss(model, blocks, batch_size=s["batch_size"]),
            "decode_tokens_per_s": max(speeds),
        }

    def generate_sample(self) -> None:
        """Greedy text from the recovered 50%-KV model, decoded over its compressed cache (type and bytes recorded)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..cache_mea import cache_nbytes, output_cache

        folder = self.folders["mea-kv50"]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        inputs = tokenizer(SAMPLE_PROMPT, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=self.settings["sample_tokens"], do_sample=False, use_cache=True,
                                    return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        cache = output_cache(output)
        self.sample = {
            "model": "mea-kv50",
            "prompt": SAMPLE_PROMPT,
            "text": tokenizer.decode(output.sequences[0], skip_special_tokens=True),
            "cache_class": type(cache).__name__,
            "cached_heads_per_layer": [layer.keys.shape[1] for layer in cache.layers],
            "kv_heads_per_layer": model.config.num_key_value_heads,
            "cached_tokens": cache.get_seq_length(),
            "cache_bytes": cache_nbytes(cache),
        }

    def report(self) -> dict:
        """Write results.json / results.md / results.png, add the scores to each folder's model card, return all."""
        from ..evaluation.compare import comparison_markdown
        from ..evaluation.harness import headline_scores
        from ..hub.model_card import update_model_card_results

        extra = ("val_loss", "decode_tokens_per_s")
        table = comparison_markdown(self.rows, extra_columns=extra)
        results = {
            "preset": self.preset,
            "settings": self.settings,
            "rows": self.rows,
            "sample": self.sample,
            "training": self.summaries,
            "stage_seconds": self.stage_seconds,
            "table_markdown": table,
        }
        sample = self.sample
        markdown = (
            f"# mea quickstart ({self.preset})\n\n{table}\n\n"
            "val_loss: mean next-token cross-entropy (nats) on the same held-out blocks; lm-eval tasks: "
            f"configs/lm_eval (limit {self.settings['eval_limit']}); decode_tokens_per_s: greedy decode after "
            f"{self.settings['decode_context']} tokens, batch 1, best of 3, this machine at this moment.\n\n"
            f"## Sample ({sample['model']}, {sample['cache_class']}: {sample['cached_heads_per_layer']} cached heads "
            f"per layer of {sample['kv_heads_per_layer']}, {sample['cache_bytes']} bytes for {sample['cached_tokens']} "
            f"tokens)\n\n```\n{sample['text']}\n```\n"
        )
        atomic_write_json(self.out / "results.json", results)
        atomic_write_text(self.out / "results.md", markdown)
        self._plot()
        for row in self.rows:
            scores = {"validation loss (quickstart blocks)": row["val_loss"], **headline_scores(row["results"])}
            update_model_card_results(self.folders[row["model"]], scores)
        return results

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..evaluation.compare import score_columns
        from ..utils.plots import save_figure

        panels = [("val_loss", "validation loss ↓")]
        panels += [
            ((task, metric), f"{task}\n{metric} {'↑' if up else '↓'}") for task, metric, up in score_columns(self.rows)
        ]
        panels += [("kv_bytes_per_token", "KV bytes/token (fp16) ↓"), ("decode_tokens_per_s", "decode tokens/s ↑")]
        columns = math.ceil(len(panels) / 2)
        figure, axes = plt.subplots(2, columns, figsize=(3.4 * columns, 7), squeeze=False)
        names = [row["model"] for row in self.rows]
        colors = ["#888888", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(names)]
        for axis, (key, title) in zip(axes.flat, panels):
            values = [
                row["results"].get(key[0], {}).get(key[1], math.nan) if isinstance(key, tuple) else row[key]
                for row in self.rows
            ]
            bars = axis.bar(range(len(names)), values, color=colors)
            axis.bar_label(bars, fmt="%.3g", fontsize=7)
            axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            axis.set_title(title, fontsize=9)
        for axis in list(axes.flat)[len(panels) :]:
            axis.set_visible(False)
        figure.suptitle(f"mea quickstart ({self.preset}): Llama vs MEA vs MEA at 50% KV cache")
        figure.tight_layout()
        save_figure(figure, self.out / "results.png")

    def run(self) -> dict:
        from tqdm.auto import tqdm

        stages = [
            ("prepare", self.prepare), ("train MEA", self.train_mea), ("train Llama twin", self.train_llama),
            ("compress KV to 50%", self.compress), ("recover", self.recover), ("measure and lm-eval", self.measure),
            ("generate sample", self.generate_sample),
        ]  # fmt: skip
        with tqdm(total=len(stages), desc="quickstart", disable=not self.progress, position=0) as bar:
            for name, stage in stages:
                bar.set_postfix_str(name)
                started = time.perf_counter()
                stage()
                self.stage_seconds[name] = round(time.perf_counter() - started, 1)
                bar.update(1)
        self.stage_seconds["total"] = round(sum(self.stage_seconds.values()), 1)
        return self.report()
