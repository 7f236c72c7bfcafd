"""`mea train`: pretrain (or continue training) an MEA or Llama model with one `accelerate` loop.

The same code runs on a laptop CPU, one GPU, or many GPUs/nodes (DDP, FSDP, DeepSpeed) under `accelerate launch`
(see `configs/accelerate/`). Recipe: AdamW (decay on weight matrices only, see `optim.py`), linear warmup then
cosine to `min_lr_ratio` or warmup-stable-decay, gradient accumulation and clipping, optional bf16 autocast and
gradient checkpointing, periodic validation loss, checkpoints every `save_every` steps with exact resume, a JSONL
metrics log, a loss-curve PNG and a final Hub-ready folder (weights, tokenizer, model card).

`train()` is three steps: `_setup` (accelerator, data, model, optimiser, resume), `_loop` (optimizer steps) and
`_finish` (final evaluation, summary, outputs). Output folder layout (`out`):
    metrics.jsonl            one JSON record per optimizer step ("loss") and per evaluation ("val_loss")
    checkpoints/step-N/      accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    loss_curve.png           training and validation loss (and KL to a teacher) against step
    final/                   the trained model, loadable with AutoModelForCausalLM (MEA: trust_remote_code works too)
    summary.json             what `train()` returns
"""

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..convert import public_name
from ..utils.atomic import atomic_write_json
from ..utils.machine import lacks_native_bf16
from .checkpoints import (
    MetricsLog,
    checkpoint_dirs,
    load_checkpoint,
    plot_loss_curve,
    remove_interrupted_saves,
    save_checkpoint,
)
from .distill import apply_train_only, attention_kl, distillation_loss, load_teacher, mean_kls
from .models import load_initial_model, load_tokenizer
from .on_policy import is_on_policy, sample_seed, student_continuations
from .optim import optimizer_and_scheduler
from .settings import TrainSettings
from .unlikelihood import unlikelihood_loss


@dataclasses.dataclass
class _Run:
    """Everything `_setup` prepares for the loop; `state` is what checkpoints save and resume restores."""

    settings: TrainSettings
    out: Path
    accelerator: object
    emit: Callable
    tokenizer: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    val_blocks: torch.Tensor
    state: dict
    log: MetricsLog
    teacher: torch.nn.Module | None = None

    def evaluate(self) -> float:
        """Validation loss now (inf if it overflows); logged, and tracked as the best so far. With a teacher the
        validation KL to it is logged too (`val_kl`; with `attention_kl_weight`, `val_attention_kl` as well) and
        kept as the latest in the state."""
        from ..evaluation.loss import mean_token_loss

        batch_size = self.settings.batch_size
        try:
            val_loss = mean_token_loss(self.model, self.val_blocks, batch_size=batch_size)
        except FloatingPointError:
            val_loss = float("inf")
        self.state["best_val_loss"] = min(self.state["best_val_loss"], val_loss)
        extra = {}
        if self.teacher is not None:
            s = self.settings
            kls = mean_kls(self.model, self.teacher, self.val_blocks, batch_size, s.distill_temperature,
                           s.distill_divergence, attention=bool(s.attention_kl_weight))  # fmt: skip
            extra = {f"val_{name}": value for name, value in kls.items()}  # val_kl, val_attention_kl
            self.state.update(extra)
        self.log.write(step=self.state["step"], val_loss=val_loss, **extra)
        return val_loss


def train(settings: "dict | TrainSettings", on_event: Callable | None = None) -> dict:
    """Run one training job (see the module docstring); returns the summary dict also written to summary.json.

    `settings` is a `TrainSettings` or a dict of its fields (validated). `on_event(event, **info)` is an optional
    Python hook called with "batch" (input_ids of each micro-batch), "step" (after each optimizer step),
    "checkpoint_saving" (state written, not yet renamed) and "end" (model).
    """
    run = _setup(TrainSettings.from_dict(settings), on_event)
    val_loss, diverged = _loop(run)
    return _finish(run, val_loss, diverged)


def _accelerator(s: TrainSettings):
    """A fresh Accelerator for this run, checked against the launcher's process count."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    # accelerate keeps one process-wide AcceleratorState; forget the previous job's (mixed precision, accumulation)
    # so that several jobs can run in one Python process. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        # Without any accelerator device, processes started by `accelerate launch --multi_gpu` or torchrun train on
        # CPU over gloo (accelerate's MULTI_CPU) instead of each running alone.
        cpu=not torch.accelerator.is_available(),
        mixed_precision="bf16" if s.bf16 else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=s.grad_accum, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=s.seed),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes}; "
                           "each would train alone and write the same output folder. Check the launcher's "
                           "distributed settings.")  # fmt: skip
    if s.bf16 and accelerator.device.type == "cpu" and lacks_native_bf16():
        warnings.warn("bf16 on a CPU without native bf16 arithmetic (no avx512_bf16, amx_bf16 or ARM bf16 in "
                      "/proc/cpuinfo) is emulated and very slow: a distillation step of SmolLM2-135M took 472 s "
                      "against 24 s in float32 on a 2-core AVX2 EPYC. Train in float32 here.", stacklevel=2)  # fmt: skip
    return accelerator


def _setup(s: TrainSettings, on_event: Callable | None) -> _Run:
    """Accelerator, output folder, tokenizer and token blocks, model, optimiser and schedule; resumed if asked."""
    from accelerate.utils import DistributedType, set_seed
    from torch.utils.data import DataLoader, TensorDataset

    from ..data.loading import cached_blocks

    out = Path(s.out)
    accelerator = _accelerator(s)
    world = accelerator.num_processes
    s = s.with_token_budget(world)

    def emit(event: str, **info) -> None:
        if on_event is not None:
            on_event(event, rank=accelerator.process_index, num_processes=world, **info)

    checkpoint = checkpoint_dirs(out)[-1] if s.resume and checkpoint_dirs(out) else None
    if checkpoint is None and ((out / "metrics.jsonl").exists() or (out / "final").exists()):
        raise FileExistsError(
            f"output folder {out} already holds a run; pass resume to continue it or choose another out."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_interrupted_saves(out)

    set_seed(s.seed)
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(s)
        train_blocks = cached_blocks(tokenizer, s.data, "train", s.block_size, s.cache_dir)
        val_blocks = cached_blocks(tokenizer, s.data, "validation", s.block_size, s.cache_dir)[: s.eval_blocks]
    if len(train_blocks) < s.batch_size * world:
        raise ValueError(f"the training data has {len(train_blocks)} blocks of {s.block_size} tokens, fewer than "
                         f"one batch ({s.batch_size} x {world} processes); lower batch_size or block_size.")  # fmt: skip
    model = load_initial_model(s, tokenizer)
    apply_train_only(model, s.train_only)
    teacher = None if s.teacher is None else load_teacher(s.teacher, model, tokenizer, accelerator.device)
    if s.attention_kl_weight:
        _attend_eagerly(model, teacher)
    if s.on_policy_fraction and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError("setting `on_policy_fraction`: the student generates its continuations unsharded; on-policy "
                         "distillation runs on one process or under DDP, not FSDP or DeepSpeed.")  # fmt: skip
    if s.gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer, scheduler = optimizer_and_scheduler(model, s, accelerator.device)
    loader = DataLoader(TensorDataset(train_blocks), batch_size=s.batch_size, shuffle=True, drop_last=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    state = {"step": 0, "tokens_seen": 0, "initial_val_loss": None, "best_val_loss": float("inf"),
             "initial_val_kl": None, "val_kl": None, "initial_val_attention_kl": None, "val_attention_kl": None,
             "train_seconds": 0.0, "num_processes": world}  # fmt: skip
    if checkpoint is not None:
        state.update(load_checkpoint(accelerator, checkpoint, world))
    log = MetricsLog(out, accelerator.is_main_process, state["step"] if checkpoint is not None else None)
    return _Run(s, out, accelerator, emit, tokenizer, model, optimizer, scheduler, loader, val_blocks, state, log,
                teacher)  # fmt: skip


def _attend_eagerly(student, teacher) -> None:
    """Switch both models to eager attention, the one that returns attention maps, after checking that the maps
    pair up: the same number of layers and of query heads."""
    shapes = [(m.config.num_hidden_layers, m.config.num_attention_heads) for m in (student, teacher)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"setting `attention_kl_weight`: the student has {shapes[0][0]} layers of {shapes[0][1]} "
                         f"query heads, the teacher {shapes[1][0]} of {shapes[1][1]}; their attention maps must "
                         "pair up.")  # fmt: skip
    for model in (student, teacher):
        model.set_attn_implementation("eager")


def _micro_batches(accelerator, loader, start: int):
    """Endless micro-batches from number `start` on: epoch e is the seeded permutation number e, and the batches a
    resumed run already consumed are skipped without being loaded."""
    epoch, skip = divmod(start, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def _optimizer_step(run: _Run, batches) -> tuple[float, float | None, float | None]:
    """One optimizer step over `grad_accum` micro-batches: (mean loss over all processes, gradient norm, mean loss of
    its on-policy micro-batches or None)."""
    s, accelerator, model = run.settings, run.accelerator, run.model
    losses, on_policy_losses, grad_norm = [], [], None
    for index in range(s.grad_accum):
        input_ids = next(batches)[0].long()  # blocks are stored as int32
        micro_batch = run.state["step"] * s.grad_accum + index
        on_policy = is_on_policy(s.seed, micro_batch, s.on_policy_fraction)
        if on_policy:
            seed = sample_seed(s.seed, micro_batch, accelerator.process_index)
            with accelerator.autocast():
                input_ids = student_continuations(accelerator.unwrap_model(model), input_ids,
                                                  s.on_policy_prompt_tokens, s.on_policy_temperature, seed)  # fmt: skip
        run.emit("batch", step=run.state["step"], input_ids=input_ids, on_policy=on_policy)
        with accelerator.accumulate(model):
            # on-policy: score the positions that predict the student's tokens, from the prompt's last one on
            loss = _loss(run, input_ids, s.on_policy_prompt_tokens - 1 if on_policy else None)
            accelerator.backward(loss)
            (on_policy_losses if on_policy else losses).append(loss.detach().float())
            if accelerator.sync_gradients:
                if s.grad_clip > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), s.grad_clip))
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
    mean = accelerator.reduce(torch.stack(losses + on_policy_losses).mean(), reduction="mean").item()
    # every process draws the same on-policy micro-batches (is_on_policy), so all of them reduce here or none does
    on_policy_mean = (accelerator.reduce(torch.stack(on_policy_losses).mean(), reduction="mean").item()
                      if on_policy_losses else None)  # fmt: skip
    return mean, grad_norm, on_policy_mean


def _loss(run: _Run, input_ids: torch.Tensor, on_policy_from: int | None = None) -> torch.Tensor:
    """The LM loss, or with a teacher `alpha * KL + (1 - alpha) * LM loss` (docs: training/distill.py), where KL is
    the logits' plus `attention_kl_weight` times the attention maps'. On an on-policy micro-batch (the student wrote
    the tokens that positions `on_policy_from` on predict) only the KL there, plus `unlikelihood_weight` times the
    unlikelihood of the student's repeats (unlikelihood.py): an LM loss would train the student on its own samples."""
    s = run.settings
    if run.teacher is None:
        return run.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    lm = s.distill_alpha < 1 and on_policy_from is None
    maps = bool(s.attention_kl_weight)
    output = run.model(input_ids=input_ids, labels=input_ids if lm else None, use_cache=False, output_attentions=maps)
    with torch.no_grad(), run.accelerator.autocast():  # the teacher in the student's precision (bf16 if asked)
        teacher_output = run.teacher(input_ids=input_ids, use_cache=False, output_attentions=maps)
    first = on_policy_from or 0
    kl = distillation_loss(
        output.logits[:, first:], teacher_output.logits[:, first:], s.distill_temperature, s.distill_divergence
    )
    if maps:
        kl = kl + s.attention_kl_weight * attention_kl(output.attentions, teacher_output.attentions, first)
    if on_policy_from is not None:
        if not s.unlikelihood_weight:
            return kl
        repeats = unlikelihood_loss(output.logits, input_ids, s.unlikelihood_ngram, on_policy_from + 1)
        return kl + s.unlikelihood_weight * repeats
    loss = s.distill_alpha * kl
    return loss + (1 - s.distill_alpha) * output.loss if lm else loss


def _loop(run: _Run) -> tuple[float | None, bool]:
    """Optimizer steps up to `max_steps` with evaluation and checkpoints; (last validation loss, diverged)."""
    from tqdm.auto import tqdm

    s, state = run.settings, run.state
    if state["initial_val_loss"] is None:
        state["initial_val_loss"] = run.evaluate()
        state["initial_val_kl"] = state["val_kl"]
        state["initial_val_attention_kl"] = state["val_attention_kl"]
    tokens_per_step = s.block_size * s.batch_size * s.grad_accum * run.accelerator.num_processes
    batches = _micro_batches(run.accelerator, run.loader, state["step"] * s.grad_accum)
    show = run.accelerator.is_main_process and s.progress
    progress = tqdm(total=s.max_steps, initial=state["step"], disable=not show, desc=f"train {run.out.name}")
    val_loss = None
    run.model.train()
    while state["step"] < s.max_steps:
        started, lr = time.perf_counter(), run.scheduler.get_last_lr()[0]
        loss, grad_norm, on_policy_loss = _optimizer_step(run, batches)
        state["step"] += 1
        state["tokens_seen"] += tokens_per_step
        state["train_seconds"] += time.perf_counter() - started
        extra = {} if on_policy_loss is None else {"on_policy_loss": on_policy_loss}
        run.log.write(step=state["step"], loss=loss, lr=lr, grad_norm=grad_norm, tokens=state["tokens_seen"], **extra)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        run.emit("step", step=state["step"], loss=loss)
        if not math.isfinite(loss):
            progress.close()
            return None, True
        val_loss = None
        if state["step"] % s.eval_every == 0 or state["step"] == s.max_steps:
            val_loss = run.evaluate()
        if s.save_every and state["step"] % s.save_every == 0:
            save_checkpoint(run.accelerator, run.out, state["step"], state, s.keep_checkpoints, run.emit)
    progress.close()
    return val_loss, False


def _final_model(run: _Run):
    """The trained model as a plain (unsharded, unwrapped) module on the main process."""
    from accelerate.utils import DistributedType

    accelerator = run.accelerator
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.unwrap_model(run.model)
    state_dict = accelerator.get_state_dict(run.model)  # gathers the shards; every process must call it
    if not accelerator.is_main_process:
        return None
    full = load_initial_model(run.settings, run.tokenizer)
    full.load_state_dict(state_dict)
    return full


def _ended_no_lower(s, state: dict, val_loss: float) -> bool:
    """Whether what training lowers ended non-finite or no lower than it started, on the validation blocks: the LM
    loss, or with a teacher the training loss's mix of KL (the logits' plus the weighted attention maps') and LM loss
    (`distill_alpha`) when both ends have a KL.
    An unlikelihood term trades some KL for fewer repeats and has no validation counterpart, so with one only a
    non-finite end counts."""
    start, end = state["initial_val_loss"], val_loss
    if state["initial_val_kl"] is not None and state["val_kl"] is not None:  # None at the start: an older checkpoint
        alpha, maps = s.distill_alpha, s.attention_kl_weight
        start_kl, end_kl = state["initial_val_kl"], state["val_kl"]
        if maps and state.get("initial_val_attention_kl") is not None:
            start_kl += maps * state["initial_val_attention_kl"]
            end_kl += maps * state["val_attention_kl"]
        start = alpha * start_kl + (1 - alpha) * start
        end = alpha * end_kl + (1 - alpha) * end
    if not (math.isfinite(val_loss) and math.isfinite(end)):
        return True
    return end >= start and not s.unlikelihood_weight


def _finish(run: _Run, val_loss: float | None, diverged: bool) -> dict:
    """Final evaluation and summary; the main process writes final/, loss_curve.png and summary.json."""
    s, state = run.settings, run.state
    if val_loss is None:
        val_loss = run.evaluate()
    diverged = diverged or _ended_no_lower(s, state, val_loss)
    summary = {
        "out_dir": str(run.out),
        "final_dir": str(run.out / "final"),
        "model": s.init_from or s.model,
        "final_val_loss": val_loss,
        "best_val_loss": state["best_val_loss"],
        "initial_val_loss": state["initial_val_loss"],
        "initial_val_kl": state["initial_val_kl"],
        "final_val_kl": state["val_kl"],
        "initial_val_attention_kl": state["initial_val_attention_kl"],
        "final_val_attention_kl": state["val_attention_kl"],
        "diverged": diverged,
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "tokens_per_second": state["tokens_seen"] / state["train_seconds"] if state["train_seconds"] else 0.0,
        "num_processes": run.accelerator.num_processes,
    }
    final_model = _final_model(run)
    run.emit("end", model=final_model)
    if run.accelerator.is_main_process:
        _write_outputs(run.out, final_model, run.tokenizer, s, summary)
    run.accelerator.wait_for_everyone()
    return summary


def _write_outputs(out: Path, model, tokenizer, s: TrainSettings, summary: dict) -> None:
    """final/ (Hub-ready, with tokenizer and model card), loss_curve.png and summary.json."""
    from ..hub import save_folder

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


def _how_made(s: TrainSettings, tokens_seen: int, num_processes: int) -> str:
    source = f"`{public_name(s.init_from)}`" if s.init_from else f"`{s.model}` (from scratch)"  # no local paths
    return (
        f"Trained with `mea train` (mea-hf, accelerate, {num_processes} process(es)) from {source} on data "
        f"`{s.data}`: {tokens_seen:,} tokens, block size {s.block_size}, AdamW lr {s.lr:g} "
        f"(weight decay {s.weight_decay:g}), {s.schedule} schedule with {s.warmup_steps} "
        f"warmup steps to {s.min_lr_ratio:g} x lr, {s.max_steps} steps, seed {s.seed}."
        + (
            f" Distilled from `{public_name(s.teacher)}` (loss {s.distill_alpha:g} x {s.distill_divergence} KL at temperature "
            f"{s.distill_temperature:g}"
            + (f" + {s.attention_kl_weight:g} x KL of the attention maps" if s.attention_kl_weight else "")
            + f" + {1 - s.distill_alpha:g} x LM loss)."
            if s.teacher
            else ""
        )
        + (
            f" On-policy: {s.on_policy_fraction:g} of the micro-batches were the student's own continuations of their "
            f"first {s.on_policy_prompt_tokens} tokens (temperature {s.on_policy_temperature:g}), scored by KL"
            + (f" + {s.unlikelihood_weight:g} x the unlikelihood of their repeated {s.unlikelihood_ngram}-grams."
               if s.unlikelihood_weight else " alone.")
            if s.on_policy_fraction  # settings allow it only with a teacher
            else ""
        )
        + (" Only the attention parameters were trained." if s.train_only == "attention" else "")
    )
