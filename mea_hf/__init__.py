"""mea-hf: Multi-head Explicit Attention (arXiv 2601.19611) as a Hugging Face Transformers model family.

`import mea_hf` registers the MEA classes with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .cache_mea import MEACache, MEAQuantizedCache, MEAStaticCache, MEAStaticQuantizedCache, cache_nbytes
from .configuration_mea import MEAConfig
from .modeling_mea import MEAForCausalLM, MEAForSequenceClassification, MEAModel, MEAPreTrainedModel

AutoConfig.register("mea", MEAConfig, exist_ok=True)
AutoModel.register(MEAConfig, MEAModel, exist_ok=True)
AutoModelForCausalLM.register(MEAConfig, MEAForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MEAConfig, MEAForSequenceClassification, exist_ok=True)

# `save_pretrained` writes `auto_map` and copies these files, so saved folders load with trust_remote_code=True
# in a Python without mea_hf (what pulling from the Hub does).
MEAConfig.register_for_auto_class()
MEAModel.register_for_auto_class("AutoModel")
MEAForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MEAForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__version__ = "0.1.0"

__all__ = [
    "MEACache",
    "MEAConfig",
    "MEAForCausalLM",
    "MEAForSequenceClassification",
    "MEAModel",
    "MEAPreTrainedModel",
    "MEAQuantizedCache",
    "MEAStaticCache",
    "MEAStaticQuantizedCache",
    "cache_nbytes",
]
