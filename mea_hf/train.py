"""`mea train`: pretrain (or continue training) an MEA or Llama model with one `accelerate` loop.

The same code runs on a laptop CPU, one GPU, or many GPUs/nodes (DDP, FSDP, DeepSpeed) under `accelerate launch`
(see `configs/accelerate/`). Recipe: AdamW (decay on weight matrices only, see `parameter_groups`), linear warmup then
cosine to `min_lr_ratio` or warmup-stable-decay, gradient accumulation and clipping, optional bf16 autocast and
gradient checkpointing, periodic validation loss, checkpoints every `save_every` steps with exact resume, a JSONL
metrics log, a loss-curve PNG and a final Hub-ready folder (weights, tokenizer, model card).

Output folder layout (`out`):
    metrics.jsonl            one JSON record per optimizer step ("loss") and per evaluation ("val_loss")
    checkpoints/step-N/      accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    loss_curve.png           training and validation loss against step
    final/                   the trained model, loadable with AutoModelForCausalLM (MEA: trust_remote_code works too)
    summary.json             what `train()` returns
"""

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .atomic import atomic_write_json, atomic_write_text
from .train_settings import add_setting_arguments, resolve_settings, settings_from_args

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
_CHECKPOINT = re.compile(r"^step-(\d+)$")
# Parameters that get no weight decay: every vector (biases), every norm scale (the per-head norm's is a matrix), the
# token embeddings (tied to the LM head in all configs here) and the HLC matrices, which start at the identity: decay
# would pull them towards zero, i.e. towards silencing heads, not towards standard attention.
_NO_DECAY_NAMES = ("norm", "embed_tokens", "hlc_k", "hlc_v")


# ----------------------------------------------------------------------------------------------------------- model
def model_config_path(model: str) -> Path:
    """`configs/models/<model>.json`, or `model` itself when it is a path to a JSON file."""
    path = Path(model)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist.")
        return path
    path = MODEL_CONFIG_DIR / f"{model}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
        raise ValueError(f"unknown model {model!r}; choose one of {known} or give a config JSON path.")
    return path


def model_config(model: str, **overrides):
    """The transformers config of `configs/models/<model>.json` (or a config JSON path), fields overridden."""
    from transformers import AutoConfig

    import mea_hf  # noqa: F401  (registers "mea")

    path = model_config_path(model)
    fields = json.loads(path.read_text(encoding="utf-8"))
    model_type = fields.pop("model_type", None)
    if model_type not in ("mea", "llama"):
        raise ValueError(f"model config {path}: `model_type` must be 'mea' or 'llama', got {model_type!r}.")
    return AutoConfig.for_model(model_type, **{**fields, **overrides})


def build_model(model: str, tokenizer, block_size: int):
    """A freshly initialised causal LM from a config JSON ("model_type" mea or llama), sized to `tokenizer`."""
    from transformers import AutoModelForCausalLM

    config = model_config(
        model,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    if block_size > config.max_position_embeddings:
        raise ValueError(
            f"block_size {block_size} exceeds max_position_embeddings {config.max_position_embeddings} of {model}."
        )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_tokenizer(settings: dict):
    """The tokenizer folder given, the one saved with `init_from`, or one trained (and cached) on the data."""
    from transformers import AutoTokenizer

    from .data import cached_tokenizer

    folder = settings["tokenizer"] or settings["init_from"]
    if folder:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist.")
        return AutoTokenizer.from_pretrained(folder)
    return cached_tokenizer(settings["data"], settings["vocab_size"], settings["cache_dir"])


def load_initial_model(settings: dict, tokenizer):
    if not settings["init_from"]:
        return build_model(settings["model"], tokenizer, settings["block_size"])
    from transformers import AutoModelForCausalLM

    import mea_hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(settings["init_from"], dtype=torch.float32)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but {settings['init_from']} has vocab_size {model.config.vocab_size}."
        )
    model.config.use_cache = False
    return model


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices; none on vectors, embeddings and HLC matrices."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim < 2 or any(part in name for part in _NO_DECAY_NAMES)
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------- run bookkeeping
def checkpoint_dirs(out) -> list[Path]:
    """Complete checkpoints of a run (those with trainer_state.json), oldest first."""
    folder = Path(out) / "checkpoints"
    found = [p for p in folder.glob("step-*") if _CHECKPOINT.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def read_metrics(out) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLog:
    """Appends JSON records to `out/metrics.jsonl` (main process only); on resume keeps records up to the step."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = out / "metrics.jsonl", enabled
        if enabled and resume_step is not None:
            kept = [r for r in read_metrics(out) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def plot_loss_curve(out: Path) -> Path:
    from .plots import line_plot

    records = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    series = {name: ([s for s, _ in pts], [v if v is not None and math.isfinite(v) else None for _, v in pts])
              for name, pts in (("train", train), ("validation", val)) if pts}  # fmt: skip
    return line_plot(out / "loss_curve.png", series, "optimizer step", "loss (nats/token)", title=str(out.name))


def _save_checkpoint(accelerator, out: Path, step: int, state: dict, keep: int, emit) -> Path:
    """accelerate state into a temporary folder, then renamed: an interrupted save leaves older ones intact."""
    folder = out / "checkpoints"
    final, tmp = folder / f"step-{step:08d}", folder / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", state)
        emit("checkpoint_saving", step=step, path=tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _micro_batches(accelerator, loader, start: int):
    """Endless micro-batches from number `start` on: epoch e is the seeded permutation number e, and the batches a
    resumed run already consumed are skipped without being loaded."""
    epoch, skip = divmod(start, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def _evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    from .loss import mean_token_loss

    try:
        return mean_token_loss(model, blocks, batch_size=batch_size)
    except FloatingPointError:
        return float("inf")


def _final_model(accelerator, model, settings, tokenizer):
    """The trained model as a plain (unsharded, unwrapped) module on the main process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers the shards; every process must call it
    if not accelerator.is_main_process:
        return None
    full = load_initial_model(settings, tokenizer)
    full.load_state_dict(state_dict)
    return full


def _optimizer_and_scheduler(model, s: dict, device: torch.device):
    """AdamW over `parameter_groups` and the LR schedule as a LambdaLR (one step per optimizer step)."""
    from .schedules import lr_multiplier

    optimizer = torch.optim.AdamW(
        parameter_groups(model, s["weight_decay"]),
        lr=s["lr"],
        betas=(s["adam_beta1"], s["adam_beta2"]),
        fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters; much faster on CPU
    )
    multiplier = lr_multiplier(s["schedule"], s["warmup_steps"], s["max_steps"], s["min_lr_ratio"], s["decay_fraction"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _write_outputs(out: Path, model, tokenizer, s: dict, summary: dict) -> None:
    """final/ (Hub-ready, with tokenizer and model card), loss_curve.png and summary.json."""
    from .hub import save_folder

    model.config.use_cache = True  # training ran without a cache; the saved model generates with one
    model.generation_config.use_cache = True
    results = {name: summary[key] for name, key in
               (("final validation loss", "final_val_loss"), ("best validation loss", "best_val_loss"),
                ("tokens seen", "tokens_seen"))}  # fmt: skip
    card = {"how_made": _how_made(s, summary["tokens_seen"], summary["num_processes"]), "results": results}
    save_folder(model, out / "final", tokenizer=tokenizer, card=card, overwrite=True)
    plot_loss_curve(out)
    finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in summary.items()}
    atomic_write_json(out / "summary.json", finite)


def _how_made(settings: dict, tokens_seen: int, num_processes: int) -> str:
    source = settings["init_from"] or f"`{settings['model']}` (from scratch)"
    return (
        f"Trained with `mea train` (mea-hf, accelerate, {num_processes} process(es)) from {source} on data "
        f"`{settings['data']}`: {tokens_seen:,} tokens, block size {settings['block_size']}, AdamW lr {settings['lr']:g} "
        f"(weight decay {settings['weight_decay']:g}), {settings['schedule']} schedule with {settings['warmup_steps']} "
        f"warmup steps to {settings['min_lr_ratio']:g} x lr, {settings['max_steps']} steps, seed {settings['seed']}."
    )


# ------------------------------------------------------------------------------------------------------ main loop
def train(settings: dict, on_event: Callable | None = None) -> dict:
    """Run one training job (see the module docstring); returns the summary dict also written to summary.json.

    `on_event(event, **info)` is an optional Python hook called with "batch" (input_ids of each micro-batch),
    "step" (after each optimizer step), "checkpoint_saving" (state written, not yet renamed) and "end" (model).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    from .data import cached_blocks

    s = resolve_settings(settings)
    out = Path(s["out"])
    # accelerate keeps one process-wide AcceleratorState; forget the previous job's (mixed precision, accumulation)
    # so that several jobs can run in one Python process. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        # Without any accelerator device, processes started by `accelerate launch --multi_gpu` or torchrun train on
        # CPU over gloo (accelerate's MULTI_CPU) instead of each running alone.
        cpu=not torch.accelerator.is_available(),
        mixed_precision="bf16" if s["bf16"] else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=s["grad_accum"], sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=s["seed"]),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
    )
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise RuntimeError(f"{launched} processes were launched but accelerate set up {world}; each would train alone "
                           "and write the same output folder. Check the launcher's distributed settings.")  # fmt: skip

    def emit(event: str, **info) -> None:
        if on_event is not None:
            on_event(event, rank=rank, num_processes=world, **info)

    checkpoint = checkpoint_dirs(out)[-1] if s["resume"] and checkpoint_dirs(out) else None
    if checkpoint is None and ((out / "metrics.jsonl").exists() or (out / "final").exists()):
        raise FileExistsError(
            f"output folder {out} already holds a run; pass resume to continue it or choose another out."
        )
    accelerator.wait_for_everyone()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "checkpoints").glob(".step-*.tmp"):
            shutil.rmtree(stale)  # left by an interrupted save

    set_seed(s["seed"])
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(s)
        train_blocks = cached_blocks(tokenizer, s["data"], "train", s["block_size"], s["cache_dir"])
        val_blocks = cached_blocks(tokenizer, s["data"], "validation", s["block_size"], s["cache_dir"])[
            : s["eval_blocks"]
        ]
    if len(train_blocks) < s["batch_size"] * world:
        raise ValueError(f"the training data has {len(train_blocks)} blocks of {s['block_size']} tokens, fewer than "
                         f"one batch ({s['batch_size']} x {world} processes); lower batch_size or block_size.")  # fmt: skip
    model = load_initial_model(s, tokenizer)
    if s["gradient_checkpointing"]:
        model.activation_checkpointing_enable()
    optimizer, scheduler = _optimizer_and_scheduler(model, s, accelerator.device)
    loader = DataLoader(TensorDataset(train_blocks), batch_size=s["batch_size"], shuffle=True, drop_last=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    state = {"step": 0, "tokens_seen": 0, "initial_val_loss": None, "best_val_loss": float("inf"),
             "train_seconds": 0.0, "num_processes": world}  # fmt: skip
    if checkpoint is not None:
        saved = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        if saved.get("num_processes", world) != world:  # the data order and RNG states are per process
            raise ValueError(f"checkpoint {checkpoint} was written by {saved['num_processes']} processes and this run "
                             f"has {world}; resume with {saved['num_processes']} to continue exactly.")  # fmt: skip
        accelerator.load_state(checkpoint)
        state.update(saved)
    log = MetricsLog(out, main, state["step"] if checkpoint is not None else None)
    tokens_per_step = s["block_size"] * s["batch_size"] * s["grad_accum"] * world

    def evaluate(step: int) -> float:
        val_loss = _evaluate(model, val_blocks, s["batch_size"])
        state["best_val_loss"] = min(state["best_val_loss"], val_loss)
        log.write(step=step, val_loss=val_loss if math.isfinite(val_loss) else None)
        return val_loss

    if state["initial_val_loss"] is None:
        state["initial_val_loss"] = evaluate(0)
    val_loss, diverged = None, False
    batches = _micro_batches(accelerator, loader, state["step"] * s["grad_accum"])
    progress = tqdm(
        total=s["max_steps"], initial=state["step"], disable=not (main and s["progress"]), desc=f"train {out.name}"
    )
    model.train()
    while state["step"] < s["max_steps"]:
        started, losses, grad_norm = time.perf_counter(), [], None
        lr = scheduler.get_last_lr()[0]
        for _ in range(s["grad_accum"]):
            input_ids = next(batches)[0].long()  # blocks are stored as int32
            emit("batch", step=state["step"], input_ids=input_ids)
            with accelerator.accumulate(model):
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
                accelerator.backward(loss)
                losses.append(loss.detach().float())
                if accelerator.sync_gradients:
                    if s["grad_clip"] > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), s["grad_clip"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        state["step"] += 1
        state["tokens_seen"] += tokens_per_step
        state["train_seconds"] += time.perf_counter() - started
        log.write(step=state["step"], loss=loss if math.isfinite(loss) else None, lr=lr,
                  grad_norm=None if grad_norm is None else float(grad_norm), tokens=state["tokens_seen"])  # fmt: skip
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        emit("step", step=state["step"], loss=loss)
        if not math.isfinite(loss):
            diverged = True
            break
        val_loss = None
        if state["step"] % s["eval_every"] == 0 or state["step"] == s["max_steps"]:
            val_loss = evaluate(state["step"])
        if state["step"] % s["save_every"] == 0:
            _save_checkpoint(accelerator, out, state["step"], state, s["keep_checkpoints"], emit)
    progress.close()

    if val_loss is None:
        val_loss = evaluate(state["step"])
    diverged = diverged or not math.isfinite(val_loss) or val_loss >= state["initial_val_loss"]
    summary = {
        "out_dir": str(out),
        "final_dir": str(out / "final"),
        "model": s["init_from"] or s["model"],
        "final_val_loss": val_loss,
        "best_val_loss": state["best_val_loss"],
        "initial_val_loss": state["initial_val_loss"],
        "diverged": diverged,
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "tokens_per_second": state["tokens_seen"] / state["train_seconds"] if state["train_seconds"] else 0.0,
        "num_processes": world,
    }
    final_model = _final_model(accelerator, model, s, tokenizer)
    emit("end", model=final_model)
    if main:
        _write_outputs(out, final_model, tokenizer, s, summary)
    accelerator.wait_for_everyone()
    return summary


# ----------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    add_setting_arguments(parser)


def run(args) -> int:
    summary = train(settings_from_args(args))
    print(json.dumps(summary, indent=2))
    return 0
