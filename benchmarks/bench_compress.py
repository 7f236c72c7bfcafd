"""KV compression benchmark: svd vs calib at 50% KV, the sensitivity-chosen "half the layers" setting at 75% KV,
right after compression and after the same short recovery run, all against the uncompressed model of the same run.

Steps (each a real `mea_hf` call):
1. pretrain a small MEA model (h = 4 KV heads, MHA) with the project's recipe (`mea_hf.recipes.pipeline`, the steps
   the quickstart takes too) on the built-in corpus;
2. compress it: all layers to h' = 2 by `svd` and by `calib` (50% KV; calib sees `--calib-blocks` training-split
   blocks), and the least sensitive half of the layers (`mea_hf.compress.sensitivity` with calib, measured on validation
   blocks disjoint from the reported ones) to h' = 2 (75% KV);
3. recover every compressed folder with the same short continued pretraining (`init_from`, `--recovery-fraction` of
   the pretraining tokens), plus the uncompressed model with the same extra training as a control;
4. report validation loss (mean_token_loss on the same validation blocks everywhere) as JSON, PNG and a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/bench_compress.py --out runs/bench_compress

(one thread per process is faster than two when other jobs share the two cores)
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from mea_hf.compress.sensitivity import layer_sensitivity, suggest_layers
from mea_hf.data.loading import cached_blocks
from mea_hf.evaluation.loss import mean_token_loss
from mea_hf.hub.folders import load_folder
from mea_hf.memory import kv_fraction
from mea_hf.recipes import pipeline
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.machine import machine_info
from mea_hf.utils.tables import markdown_table

MODEL = {
    "model_type": "mea", "hlc_keys": True, "hlc_values": True, "head_norm": "rms", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "intermediate_size": 384, "vocab_size": 4096, "max_position_embeddings": 1024,
    "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_compress")
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"], help="decoder layers of the model")
    parser.add_argument("--steps", type=int, default=600, help="pretraining optimizer steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="pretraining peak learning rate")
    parser.add_argument("--recovery-fraction", type=float, default=0.05, help="recovery tokens / pretraining tokens")
    parser.add_argument("--recovery-lr", type=float, help="peak recovery LR (default: where pretraining ended, lr/10)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-blocks", type=int, default=32, help="validation blocks every loss is measured on")
    parser.add_argument("--sensitivity-blocks", type=int, default=16, help="other validation blocks, for layer choice")
    parser.add_argument("--calib-blocks", type=int, default=16, help="training-split blocks for method calib")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def training_settings(args, out: Path, **overrides) -> dict:
    return {
        "data": "builtin", "block_size": args.block_size, "batch_size": args.batch_size, "eval_blocks": args.eval_blocks,
        "seed": args.seed, "out": str(out), "progress": False, **overrides,
    }  # fmt: skip


def results_table(results: dict) -> str:
    base = results["uncompressed"]
    header = ["setting", "KV cache", "val loss after compression", "vs uncompressed", "val loss after recovery",
              "vs uncompressed", "vs uncompressed + same training"]  # fmt: skip
    rows = []
    for name, entry in results["settings"].items():
        after, recovered = entry["loss_after_compression"], entry["loss_after_recovery"]
        rows.append([name, f"{100 * entry['kv_fraction']:.0f}%", f"{after:.4f}", f"{after / base['loss'] - 1:+.2%}",
                     f"{recovered:.4f}", f"{recovered / base['loss'] - 1:+.2%}",
                     f"{recovered / base['loss_after_recovery'] - 1:+.2%}"])  # fmt: skip
    rows.append(["uncompressed", "100%", f"{base['loss']:.4f}", "+0.00%", f"{base['loss_after_recovery']:.4f}",
                 f"{base['loss_after_recovery'] / base['loss'] - 1:+.2%}", "+0.00%"])  # fmt: skip
    return markdown_table(header, rows)


def plot(results: dict, path: Path) -> None:
    from mea_hf.utils.plots import plt, save_figure

    names = list(results["settings"])
    figure, axes = plt.subplots(figsize=(8, 4.5))
    positions = range(len(names))
    axes.bar([p - 0.2 for p in positions], [results["settings"][n]["loss_after_compression"] for n in names], 0.4,
             label="right after compression")  # fmt: skip
    axes.bar([p + 0.2 for p in positions], [results["settings"][n]["loss_after_recovery"] for n in names], 0.4,
             label="after recovery")  # fmt: skip
    base = results["uncompressed"]
    axes.axhline(base["loss"], color="black", linestyle="--", label="uncompressed")
    axes.axhline(base["loss_after_recovery"], color="gray", linestyle=":", label="uncompressed + same training")
    axes.set_xticks(list(positions), names)
    axes.set_ylabel("validation loss (nats/token)")
    low = min(base["loss"], base["loss_after_recovery"])
    axes.set_ylim(low * 0.97, max(e["loss_after_compression"] for e in results["settings"].values()) * 1.02)
    axes.set_title(f"KV compression of a {results['config']['model']['num_hidden_layers']}-layer MEA model "
                   f"({results['config']['recovery_fraction']:.0%} of the tokens to recover)")  # fmt: skip
    axes.legend(fontsize=8)
    axes.grid(True, axis="y", alpha=0.3)
    save_figure(figure, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.recovery_lr = args.recovery_lr or args.lr / 10
    transformers_logging.disable_progress_bar()  # one bar for the whole benchmark
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    model_config = {**MODEL, "num_hidden_layers": args.layers}
    atomic_write_json(out / "model.json", model_config)
    torch.manual_seed(args.seed)
    recovery_steps = max(1, math.floor(args.steps * args.recovery_fraction))
    settings_plan = ["svd-50%", "calib-50%", "calib-half-layers-75%"]
    progress = tqdm(total=2 + 2 * len(settings_plan) + 1, desc="bench_compress")
    timings = {}

    def stage(name: str):
        progress.set_postfix_str(name)
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = time.perf_counter() - timings[name]
        progress.update(1)

    stage("pretrain")
    pretrain = pipeline.pretrain(training_settings(
        args, out / "base", model=str(out / "model.json"), max_steps=args.steps, lr=args.lr,
        warmup_steps=max(1, args.steps // 20), eval_every=args.steps, save_every=args.steps))  # fmt: skip
    done("pretrain")
    base_folder = Path(pretrain["final_dir"])
    model, tokenizer = load_folder(base_folder, "float32")
    validation = cached_blocks(tokenizer, "builtin", "validation", args.block_size)
    needed = args.eval_blocks + args.sensitivity_blocks
    if len(validation) < needed:
        raise SystemExit(f"the validation split has {len(validation)} blocks, fewer than the {needed} needed.")
    eval_blocks, sensitivity_blocks = validation[: args.eval_blocks], validation[args.eval_blocks : needed]
    calib_blocks = cached_blocks(tokenizer, "builtin", "train", args.block_size)
    calib_blocks = calib_blocks[
        torch.randperm(len(calib_blocks), generator=torch.Generator().manual_seed(args.seed))[: args.calib_blocks]
    ]
    base_loss = mean_token_loss(model, eval_blocks)

    stage("sensitivity")
    sensitivity = layer_sensitivity(model, 2, sensitivity_blocks, "calib", calib_blocks)
    half_layers = suggest_layers(sensitivity, 0.75)
    done("sensitivity")

    results = {
        "config": {
            **vars(args),
            "model": model_config,
            "recovery_steps": recovery_steps,
            "tokens_per_step": args.block_size * args.batch_size,
        },
        "pretrain": pretrain,
        "sensitivity": sensitivity,
        "uncompressed": {"loss": base_loss, "kv_fraction": 1.0},
        "settings": {},
    }
    plans = {"svd-50%": ("svd", None), "calib-50%": ("calib", None), "calib-half-layers-75%": ("calib", half_layers)}
    for name, (method, layers) in plans.items():
        stage(f"compress {name}")
        folder, compressed = pipeline.compress(base_folder, out / "compressed" / name, 2, method, calib_blocks, layers)
        results["settings"][name] = {
            "method": method, "layers": layers if layers is not None else list(range(args.layers)),
            "kv_fraction": kv_fraction(compressed.config), "loss_after_compression": mean_token_loss(compressed, eval_blocks),
            "folder": str(folder),
        }  # fmt: skip
        done(f"compress {name}")

    recover = {
        **{name: Path(entry["folder"]) for name, entry in results["settings"].items()},
        "uncompressed": base_folder,
    }
    for name, folder in recover.items():
        stage(f"recover {name}")
        settings = training_settings(args, out / "recovery" / name, eval_every=recovery_steps,
                                     save_every=recovery_steps + 1)  # fmt: skip
        summary = pipeline.recover(folder, recovery_steps, args.recovery_lr, settings)
        recovered_loss = pipeline.folder_loss(summary["final_dir"], eval_blocks)
        entry = results["uncompressed"] if name == "uncompressed" else results["settings"][name]
        entry.update(loss_after_recovery=recovered_loss, recovery_tokens=summary["tokens_seen"],
                     recovery_token_fraction=summary["tokens_seen"] / pretrain["tokens_seen"])  # fmt: skip
        done(f"recover {name}")
    progress.close()

    svd, calib = results["settings"]["svd-50%"], results["settings"]["calib-50%"]
    results["targets"] = {
        "calib below svd right after compression at 50% KV": calib["loss_after_compression"]
        < svd["loss_after_compression"],
        "calib-50% within 2% of uncompressed after recovery": calib["loss_after_recovery"] <= 1.02 * base_loss,
        "svd-50% within 2% of uncompressed after recovery": svd["loss_after_recovery"] <= 1.02 * base_loss,
    }
    results["seconds"] = timings
    results["machine"] = machine_info()
    table = results_table(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n")
    plot(results, out / "results.png")
    print(f"\npretrained {pretrain['tokens_seen']:,} tokens; recovery {recovery_steps} steps = "
          f"{results['uncompressed']['recovery_token_fraction']:.1%} of them; half-layers set: {half_layers}\n")  # fmt: skip
    print(table)
    print()
    for target, met in results["targets"].items():
        print(f"- {target}: {'yes' if met else 'NO'}")
    print(f"\nwrote {out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
