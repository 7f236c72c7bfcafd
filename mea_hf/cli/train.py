"""`mea train`: pretrain (or continue training) an MEA or Llama model (`mea_hf.training.train`)."""

import json

from ..training.loop import train
from ..training.settings import add_setting_arguments, settings_from_args


def add_arguments(parser) -> None:
    add_setting_arguments(parser)


def run(args) -> int:
    summary = train(settings_from_args(args))
    print(json.dumps(summary, indent=2))
    return 0
