"""Training settings: one typed dataclass with defaults and validation, YAML/JSON config files, CLI flags.

Every field is also a `mea train` flag (`block_size` -> `--block-size`); a `--config FILE` sets several at once and
flags given on the command line win over the file. Python callers may pass `train()` a plain dict of the same keys.
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import yaml

from .schedules import SCHEDULES

TRAIN_ONLY = ("all", "attention")  # which parameters `train_only` leaves trainable
DIVERGENCES = ("forward", "reverse")  # KL(teacher || student) or KL(student || teacher); training/distill.py


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything one `mea train` run depends on. Build it with `TrainSettings.from_dict` to validate."""

    model: str | None = "tiny-mea"  # name under mea_hf/resources/models/ or a path to a config JSON
    init_from: str | None = None  # saved model folder (with tokenizer) to continue training instead of `model`
    data: str = "builtin"  # "builtin", a local .txt/.jsonl file or folder, or a datasets name
    tokenizer: str | None = None  # tokenizer folder; None: train a BPE tokenizer on the training split
    vocab_size: int = 4096  # size of that trained tokenizer
    block_size: int = 256
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    max_steps: int = 200  # optimizer steps
    max_tokens: int = 0  # token budget: when > 0 it sets max_steps = ceil(max_tokens / tokens per optimizer step)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # WSD only: share of steps spent decaying
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 50
    eval_blocks: int = 64
    save_every: int = 100  # 0: never save checkpoints (only final/)
    keep_checkpoints: int = 2
    seed: int = 0
    out: str = "runs/train"
    bf16: bool = False
    gradient_checkpointing: bool = False
    resume: bool = False
    cache_dir: str | None = None  # tokenised-data cache; None: $MEA_HF_CACHE or ~/.cache/mea_hf
    progress: bool = True  # tqdm bar
    teacher: str | None = None  # saved model folder to distil from (KL to its logits); same vocabulary as the student
    distill_alpha: float = 1.0  # with `teacher`: loss = alpha * KL + (1 - alpha) * LM loss
    distill_temperature: float = 1.0  # with `teacher`: softmax temperature of both distributions
    distill_divergence: str = "forward"  # with `teacher`: "forward" or "reverse" KL (training/distill.py)
    attention_kl_weight: float = 0.0  # with `teacher`: + weight x KL of its attention maps (distill.py; eager attention)
    train_only: str = "all"  # "all" or "attention" (freeze embeddings, MLPs, norms and the LM head)
    on_policy_fraction: float = 0.0  # with `teacher`: share of micro-batches the student writes itself (on_policy.py)
    on_policy_prompt_tokens: int = 32  # tokens of each block kept as the prompt of an on-policy micro-batch
    on_policy_temperature: float = 1.0  # sampling temperature of the student's continuations; 0: greedy
    unlikelihood_weight: float = 0.0  # on on-policy micro-batches: + weight x unlikelihood of repeats (unlikelihood.py)
    unlikelihood_ngram: int = 4  # n of the repeated n-grams that the unlikelihood term charges

    @classmethod
    def from_dict(cls, settings: "dict | TrainSettings") -> "TrainSettings":
        """The defaults updated with `settings`, type-checked; raises ValueError naming the first bad key."""
        if isinstance(settings, cls):
            return settings
        unknown = sorted(set(settings) - set(FIELD_TYPES))
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(FIELD_TYPES)}.")
        values = {**DEFAULTS, **settings}
        for key, kind in FIELD_TYPES.items():
            values[key] = _checked(key, values[key], kind)
        resolved = cls(**values)
        resolved._check_ranges()
        return resolved

    def _check_ranges(self) -> None:
        for key in ("vocab_size", "block_size", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_blocks",
                    "keep_checkpoints", "lr"):  # fmt: skip
            if getattr(self, key) <= 0:
                raise ValueError(f"setting `{key}` must be positive, got {getattr(self, key)!r}.")
        if self.max_tokens < 0:
            raise ValueError(f"setting `max_tokens` must be >= 0 (0: max_steps decides), got {self.max_tokens}.")
        if self.save_every < 0:
            raise ValueError(f"setting `save_every` must be >= 0 (0: no checkpoints), got {self.save_every}.")
        if self.resume and self.save_every == 0:
            raise ValueError("setting `resume` needs checkpoints; `save_every` 0 writes none.")
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise ValueError(f"setting `warmup_steps` must be in [0, max_steps), got {self.warmup_steps}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"setting `schedule` must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("settings `weight_decay` and `grad_clip` must be >= 0 (grad_clip 0 disables clipping).")
        if not self.model and not self.init_from:
            raise ValueError("give `model` (a config name or JSON path) or `init_from` (a saved folder).")
        self._check_distillation()

    def _check_distillation(self) -> None:
        if self.train_only not in TRAIN_ONLY:
            raise ValueError(f"setting `train_only` must be one of {TRAIN_ONLY}, got {self.train_only!r}.")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"setting `distill_alpha` must be in [0, 1], got {self.distill_alpha}.")
        if self.distill_temperature <= 0:
            raise ValueError(f"setting `distill_temperature` must be positive, got {self.distill_temperature}.")
        if self.distill_divergence not in DIVERGENCES:
            raise ValueError(f"setting `distill_divergence` must be one of {DIVERGENCES}, got "
                             f"{self.distill_divergence!r}.")  # fmt: skip
        if not 0 <= self.on_policy_fraction <= 1:
            raise ValueError(f"setting `on_policy_fraction` must be in [0, 1], got {self.on_policy_fraction}.")
        if self.on_policy_fraction and not 1 <= self.on_policy_prompt_tokens < self.block_size:
            raise ValueError(f"setting `on_policy_prompt_tokens` must be in [1, block_size {self.block_size}), got "
                             f"{self.on_policy_prompt_tokens}: the student must write at least one token.")  # fmt: skip
        if self.on_policy_temperature < 0:
            raise ValueError(f"setting `on_policy_temperature` must be >= 0 (0: greedy), got "
                             f"{self.on_policy_temperature}.")  # fmt: skip
        if self.attention_kl_weight < 0:
            raise ValueError(f"setting `attention_kl_weight` must be >= 0, got {self.attention_kl_weight}.")
        if self.unlikelihood_weight < 0:
            raise ValueError(f"setting `unlikelihood_weight` must be >= 0, got {self.unlikelihood_weight}.")
        if self.unlikelihood_weight and not self.on_policy_fraction:
            raise ValueError("setting `unlikelihood_weight` charges the student's own repeats: it needs "
                             "`on_policy_fraction` > 0.")  # fmt: skip
        if self.unlikelihood_ngram < 1:
            raise ValueError(f"setting `unlikelihood_ngram` must be >= 1, got {self.unlikelihood_ngram}.")
        if self.teacher is None:
            if (
                self.distill_alpha != 1
                or self.distill_temperature != 1
                or self.distill_divergence != "forward"
                or self.attention_kl_weight
                or self.on_policy_fraction
            ):
                raise ValueError("settings `distill_alpha`, `distill_temperature`, `distill_divergence`, "
                                 "`attention_kl_weight` and `on_policy_fraction` need a `teacher` folder.")  # fmt: skip
            return
        if not self.init_from:
            raise ValueError("setting `teacher` needs `init_from` (the student folder, with the teacher's tokenizer); "
                             "a fresh `model` would use a tokenizer trained on the data.")  # fmt: skip
        if self.tokenizer is not None:
            raise ValueError("setting `teacher`: leave `tokenizer` unset; the student folder's tokenizer is used.")

    def with_token_budget(self, num_processes: int) -> "TrainSettings":
        """These settings with `max_steps` from `max_tokens` (when set) for `num_processes` processes."""
        if not self.max_tokens:
            return self
        per_step = self.block_size * self.batch_size * self.grad_accum * num_processes
        steps = -(-self.max_tokens // per_step)
        if self.warmup_steps >= steps:
            raise ValueError(f"setting `max_tokens` {self.max_tokens} gives {steps} steps of {per_step} tokens, not "
                             f"more than `warmup_steps` {self.warmup_steps}; lower warmup_steps.")  # fmt: skip
        return dataclasses.replace(self, max_steps=steps)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainSettings)}
# The base type of each field: int, float, bool or str. The path-like fields may also be None.
FIELD_TYPES = {name: type(default) if default is not None else str for name, default in DEFAULTS.items()}
FIELD_TYPES["model"] = str
OPTIONAL = {name for name, default in DEFAULTS.items() if default is None} | {"model"}


def _checked(key: str, value, kind: type):
    """`value` as a `kind` setting, or a ValueError naming `key` (ints are accepted for floats, never bools)."""
    if value is None and key in OPTIONAL:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"setting `{key}` must be true or false, got {value!r}.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"setting `{key}` must be an integer, got {value!r}.")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"setting `{key}` must be a number, got {value!r}.")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"setting `{key}` must be a string, got {value!r}.")
    return value


def load_config_file(path) -> dict:
    """Settings from a YAML or JSON file (a mapping of setting names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(
            f"training config {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"training config {path} must hold a mapping of settings, got {type(data).__name__}.")
    return data


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_setting_arguments(parser, exclude: tuple[str, ...] = (), shown_defaults: dict | None = None) -> None:
    """`--config FILE` plus one flag per setting not in `exclude` (default None = not given, so the file or the
    defaults decide; `shown_defaults` overrides the defaults named in the help)."""
    parser.add_argument("--config", help="YAML/JSON file of settings (configs/train/*.yaml); flags override it.")
    for key, default in {**DEFAULTS, **(shown_defaults or {})}.items():
        if key in exclude:
            continue
        if FIELD_TYPES[key] is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(_flag(key), dest=key, action=action, default=None, help=f"(default {default})")
        else:
            parser.add_argument(_flag(key), dest=key, type=FIELD_TYPES[key], default=None, help=f"(default {default})")


def settings_from_args(args, exclude: tuple[str, ...] = ()) -> dict:
    """The config file's settings overridden by every flag given on the command line (keys in `exclude` are not
    read from the flags: `add_setting_arguments` did not define them)."""
    settings = load_config_file(args.config) if args.config else {}
    flags = [key for key in DEFAULTS if key not in exclude]
    settings.update({key: getattr(args, key) for key in flags if getattr(args, key, None) is not None})
    return settings
