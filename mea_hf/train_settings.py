"""Training settings: defaults, validation, YAML/JSON config files and CLI overrides for `mea train`.

Every key is also a `mea train` flag (`block_size` -> `--block-size`); a `--config FILE` sets several at once and
flags given on the command line win over the file.
"""

import argparse
import json
from pathlib import Path

import yaml

from .schedules import SCHEDULES

DEFAULTS = {
    "model": "tiny-mea",  # name under configs/models/ or a path to a config JSON
    "init_from": None,  # saved model folder (with tokenizer) to continue training instead of `model`
    "data": "builtin",  # "builtin", a local .txt/.jsonl file or folder, or a datasets name
    "tokenizer": None,  # tokenizer folder; None: train a BPE tokenizer on the training split
    "vocab_size": 4096,  # size of that trained tokenizer
    "block_size": 256,
    "batch_size": 8,  # per process and micro-batch
    "grad_accum": 1,
    "max_steps": 200,  # optimizer steps
    "lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 20,
    "schedule": "cosine",
    "decay_fraction": 0.2,  # WSD only: share of steps spent decaying
    "weight_decay": 0.1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "grad_clip": 1.0,
    "eval_every": 50,
    "eval_blocks": 64,
    "save_every": 100,
    "keep_checkpoints": 2,
    "seed": 0,
    "out": "runs/train",
    "bf16": False,
    "gradient_checkpointing": False,
    "resume": False,
    "cache_dir": None,  # tokenised-data cache; None: $MEA_HF_CACHE or ~/.cache/mea_hf
    "progress": True,  # tqdm bar
}
_INT_KEYS = ("vocab_size", "block_size", "batch_size", "grad_accum", "max_steps", "warmup_steps", "eval_every",
             "eval_blocks", "save_every", "keep_checkpoints", "seed")  # fmt: skip
_FLOAT_KEYS = ("lr", "min_lr_ratio", "decay_fraction", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip")
_BOOL_KEYS = ("bf16", "gradient_checkpointing", "resume", "progress")
_POSITIVE = ("vocab_size", "block_size", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_blocks",
             "save_every", "keep_checkpoints", "lr")  # fmt: skip


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


def resolve_settings(settings: dict) -> dict:
    """DEFAULTS updated with `settings`, type-checked; raises ValueError naming the first bad key."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(DEFAULTS)}.")
    resolved = {**DEFAULTS, **settings}
    for key in _INT_KEYS:
        if isinstance(resolved[key], bool) or not isinstance(resolved[key], int):
            raise ValueError(f"setting `{key}` must be an integer, got {resolved[key]!r}.")
    for key in _FLOAT_KEYS:
        if isinstance(resolved[key], bool) or not isinstance(resolved[key], (int, float)):
            raise ValueError(f"setting `{key}` must be a number, got {resolved[key]!r}.")
        resolved[key] = float(resolved[key])
    for key in _BOOL_KEYS:
        if not isinstance(resolved[key], bool):
            raise ValueError(f"setting `{key}` must be true or false, got {resolved[key]!r}.")
    for key in _POSITIVE:
        if resolved[key] <= 0:
            raise ValueError(f"setting `{key}` must be positive, got {resolved[key]!r}.")
    if resolved["warmup_steps"] < 0 or resolved["warmup_steps"] >= resolved["max_steps"]:
        raise ValueError(f"setting `warmup_steps` must be in [0, max_steps), got {resolved['warmup_steps']}.")
    if resolved["schedule"] not in SCHEDULES:
        raise ValueError(f"setting `schedule` must be one of {SCHEDULES}, got {resolved['schedule']!r}.")
    if resolved["weight_decay"] < 0 or resolved["grad_clip"] < 0:
        raise ValueError("settings `weight_decay` and `grad_clip` must be >= 0 (grad_clip 0 disables clipping).")
    if not resolved["model"] and not resolved["init_from"]:
        raise ValueError("give `model` (a config name or JSON path) or `init_from` (a saved folder).")
    return resolved


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_setting_arguments(parser, exclude: tuple[str, ...] = (), shown_defaults: dict | None = None) -> None:
    """`--config FILE` plus one flag per setting not in `exclude` (default None = not given, so the file or the
    defaults decide; `shown_defaults` overrides the defaults named in the help)."""
    parser.add_argument("--config", help="YAML/JSON file of settings (configs/train/*.yaml); flags override it.")
    for key, default in {**DEFAULTS, **(shown_defaults or {})}.items():
        if key in exclude:
            continue
        if key in _BOOL_KEYS:
            action = argparse.BooleanOptionalAction
            parser.add_argument(_flag(key), dest=key, action=action, default=None, help=f"(default {default})")
        else:
            kind = int if key in _INT_KEYS else float if key in _FLOAT_KEYS else str
            parser.add_argument(_flag(key), dest=key, type=kind, default=None, help=f"(default {default})")


def settings_from_args(args, exclude: tuple[str, ...] = ()) -> dict:
    """The config file's settings overridden by every flag given on the command line (keys in `exclude` are not
    read from the flags: `add_setting_arguments` did not define them)."""
    settings = load_config_file(args.config) if args.config else {}
    flags = [key for key in DEFAULTS if key not in exclude]
    settings.update({key: getattr(args, key) for key in flags if getattr(args, key, None) is not None})
    return settings
