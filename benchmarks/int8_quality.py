"""Quality of the int8 cache: loss on held-out text with the float MEACache vs MEAQuantizedCache.

Each held-out document (the built-in corpus' validation split) is fed in chunks of `--chunk` tokens through a cache,
so every chunk after the first attends over cached (for int8: quantised) keys and values, as decoding does. The loss
is the mean next-token NLL over all predicted tokens; bits per byte = total NLL / ln 2 / UTF-8 bytes of the text.

    python benchmarks/int8_quality.py runs/quickstart/mea-kv50/final --out runs/int8_quality.json
"""

import argparse
import math
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mea_hf  # noqa: F401  (registers the MEA classes)
from mea_hf.cache_mea import CACHE_ARG, MEACache, MEAQuantizedCache
from mea_hf.data.corpus import builtin_corpus
from mea_hf.utils.atomic import atomic_write_json


@torch.inference_mode()
def nll_and_bytes(model, tokenizer, texts, make_cache, chunk: int, max_tokens: int) -> tuple[float, int, int]:
    """Summed next-token NLL, predicted tokens and UTF-8 bytes over `texts`, decoding through `make_cache()`."""
    total, count, nbytes = 0.0, 0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
        if ids.shape[1] < 2:
            continue
        cache = make_cache()
        for start in range(0, ids.shape[1] - 1, chunk):
            inputs, targets = ids[:, start : start + chunk], ids[:, start + 1 : start + chunk + 1]
            logits = model(input_ids=inputs, **{CACHE_ARG: cache}).logits[:, : targets.shape[1]]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            count += targets.numel()
        nbytes += len(tokenizer.decode(ids[0]).encode())
    return total, count, nbytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a saved MEA model folder (with its tokenizer)")
    parser.add_argument("--documents", type=int, default=20, help="held-out documents to read")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per document")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per cached forward")
    parser.add_argument("--residual-length", type=int, default=0, help="recent tokens kept in full precision")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    texts = builtin_corpus()["validation"][: args.documents]
    caches = {"float": lambda: MEACache(model.config),
              "int8": lambda: MEAQuantizedCache(model.config, residual_length=args.residual_length)}  # fmt: skip
    results = {}
    for name, make_cache in caches.items():
        nll, tokens, nbytes = nll_and_bytes(model, tokenizer, texts, make_cache, args.chunk, args.max_tokens)
        results[name] = {"loss": nll / tokens, "bits_per_byte": nll / math.log(2) / nbytes, "tokens": tokens}
    results["loss_increase_relative"] = results["int8"]["loss"] / results["float"]["loss"] - 1
    print(f"loss float {results['float']['loss']:.5f}  int8 {results['int8']['loss']:.5f}  "
          f"({100 * results['loss_increase_relative']:+.3f}%); bits/byte float {results['float']['bits_per_byte']:.5f} "
          f"int8 {results['int8']['bits_per_byte']:.5f}")  # fmt: skip
    if args.out:
        atomic_write_json(args.out, {"settings": vars(args), **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
