"""torch.compile check: a decode step over MEAStaticCache compiled by inductor (fullgraph) gives the eager logits.

The test suite checks the same with the cheap `aot_eager` backend (graph capture, no code generation), because an
inductor compile takes over 30 s on a busy 2-core CPU. This script runs the real inductor backend for both decode
paths on a tiny compressed model (one layer at h' = h, one at h' < h), for several consecutive decode steps, and
exits with status 1 if any logits differ by more than 1e-4.

    python benchmarks/check_compile_decode.py
"""

import sys
import time

import torch

from mea_hf.cache_mea import MEAStaticCache
from mea_hf.configuration_mea import MEAConfig
from mea_hf.modeling_mea import MEAForCausalLM
from mea_hf.utils.tables import markdown_table

TOLERANCE = 1e-4


def check(path: str, steps: int = 4) -> tuple[float, float]:
    """(largest logit difference over `steps` compiled decode steps, seconds incl. compilation) for one path."""
    torch.manual_seed(0)
    config = MEAConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_component_heads=[2, 1], kv_decode=path,
    )  # fmt: skip
    model = MEAForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # nothing identity: HLC and norm scales random too
            parameter.add_(torch.randn_like(parameter) * 0.1)
    prompt = torch.randint(3, 128, (2, 5))
    caches = [MEAStaticCache(config, max_cache_len=16) for _ in range(2)]
    compiled = torch.compile(model, fullgraph=True)
    tokens, worst, started = prompt[:, -1:], 0.0, time.perf_counter()
    with torch.no_grad():
        for cache in caches:
            model(prompt, cache=cache)
        for step in range(steps):
            position = torch.full((2, 1), prompt.shape[1] + step)
            eager = model(input_ids=tokens, position_ids=position, cache=caches[0]).logits
            fast = compiled(input_ids=tokens, position_ids=position, cache=caches[1]).logits
            worst = max(worst, (fast - eager).abs().max().item())
            tokens = eager[:, -1:].argmax(-1)
    return worst, time.perf_counter() - started


def main() -> int:
    rows = [[path, *check(path)] for path in ("reconstruct", "absorb")]
    header = ["decode path", "max abs logit difference, compiled vs eager", "seconds (incl. compile)"]
    print(markdown_table(header, [[path, f"{worst:.2e}", f"{seconds:.0f}"] for path, worst, seconds in rows]))
    return int(any(worst > TOLERANCE for _, worst, _ in rows))


if __name__ == "__main__":
    sys.exit(main())
