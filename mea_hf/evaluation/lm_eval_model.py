"""lm-evaluation-harness model `mea`: Hugging Face's `hf` model with mea_hf imported and the MEA cache options exposed.

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), so the `lm_eval` command knows `mea`
only once this module is imported. Three ways to use it:

    mea-lm-eval --model mea --model_args pretrained=DIR,kv_decode=absorb --tasks ... --device cpu
    python -m mea_hf.evaluation.lm_eval_model --model mea --model_args pretrained=DIR --tasks ... --device cpu
    lm_eval.simple_evaluate(model="mea", ...)        # in Python, after `import mea_hf.evaluation.lm_eval_model`

(`mea-lm-eval` and `python -m mea_hf.evaluation.lm_eval_model` take exactly the `lm_eval` command's arguments.) The plain
`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` works on the same folders without mea_hf.

Generation goes through `generate()`, whose cache for an MEA model is the compressed `MEACache` (or `MEAStaticCache`
with `cache_implementation=static`): lm-eval's generate_until tasks decode over the h' component heads only.
"""

from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

import mea_hf  # noqa: F401  (registers the MEA Auto classes: no trust_remote_code needed)

from ..cache_mea import INT8_BACKEND
from ..configuration_mea import KV_DECODE_PATHS

# generate() cache kinds that MEAForCausalLM turns into its compressed cache (dynamic or static, offloaded or not;
# "quantized": the int8 cache, `MEAQuantizedCache`, selected with cache_config={"backend": "mea-int8"}).
CACHE_IMPLEMENTATIONS = ("dynamic", "static", "offloaded", "offloaded_static", "quantized")


class MEALM(HFLM):
    """`hf` with mea_hf's classes. Extra model_args: `kv_decode` (auto | reconstruct | absorb: how decode steps attend
    over the compressed cache) and `cache_implementation` (dynamic | static | offloaded | offloaded_static |
    quantized, the last being the MEA int8 cache)."""

    def __init__(self, pretrained, kv_decode: str | None = None, cache_implementation: str | None = None, **kwargs):
        if kv_decode is not None and kv_decode not in KV_DECODE_PATHS:
            raise ValueError(f"model_args kv_decode must be one of {KV_DECODE_PATHS}, got {kv_decode!r}.")
        if cache_implementation is not None and cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"model_args cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}."
            )
        kwargs["trust_remote_code"] = False  # the classes come from mea_hf, never from the folder's code
        super().__init__(pretrained=pretrained, **kwargs)
        if kv_decode is not None:
            if self.model.config.model_type != "mea":
                raise ValueError(
                    f"kv_decode applies to MEA models only; {pretrained} is a {self.model.config.model_type}."
                )
            self.model.config.kv_decode = kv_decode
        self.cache_implementation = cache_implementation

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.cache_implementation is not None:
            generation_kwargs.setdefault("cache_implementation", self.cache_implementation)
        if self.cache_implementation == "quantized":
            generation_kwargs.setdefault("cache_config", {"backend": INT8_BACKEND})
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


# Registered by import path, so `python -m mea_hf.evaluation.lm_eval_model` (this file as __main__) and a later
# `import mea_hf.evaluation.lm_eval_model` name the same class instead of clashing in lm-eval's registry.
model_registry.register("mea", target="mea_hf.evaluation.lm_eval_model:MEALM")


def main() -> None:
    """The `lm_eval` command with the `mea` model registered (entry point `mea-lm-eval`)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
