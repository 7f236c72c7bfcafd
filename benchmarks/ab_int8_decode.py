"""Same-process A/B of int8 decode: this checkout's MEA code against the code of another git revision (`--base`).

On a shared machine, timings of separate runs are not comparable; here both versions decode in one process, in
interleaved rounds (order rotated each round), so load from other processes hits them alike. The base revision's
`mea_hf/{configuration,cache,modeling}_mea.py` are loaded from git as a separate package (`mea_base`), the model gets
this checkout's weights, and both fill their own int8 cache (`MEAQuantizedCache`) with the same context. Rows:
Llama (DynamicCache; every tokens/s ratio is against it), MEA with its float cache (this checkout), and MEA with the
int8 cache, base and this checkout. Reported per context: median tokens/s, x Llama, and the median over rounds of the
paired ratio int8 (this checkout) / int8 (base), with the load average.

    python benchmarks/ab_int8_decode.py --base main --contexts 2048 8192 --heads-fraction 2
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import build  # benchmarks/ is not a package: imported by path

from mea_hf.cache_mea import MEAQuantizedCache
from mea_hf.evaluation.speed import prefill, time_decode

REPO = Path(__file__).resolve().parents[1]
FILES = ("configuration_mea.py", "cache_mea.py", "modeling_mea.py", "paged_attention.py")  # the model's own code


def load_base(revision: str, folder: Path):
    """The MEA modules of `revision` as the package `mea_base` (imported from `folder`)."""
    package = folder / "mea_base"
    package.mkdir()
    (package / "__init__.py").write_text("")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", revision, "mea_hf/"], check=True,
                            capture_output=True, text=True).stdout.split()  # fmt: skip
    for name in FILES:
        if f"mea_hf/{name}" not in listed:  # older revisions have fewer of them
            continue
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:mea_hf/{name}"], check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
        (package / name).write_text(source)
    spec = importlib.util.spec_from_file_location("mea_base", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])  # fmt: skip
    sys.modules["mea_base"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["mea_base"])
    return (__import__("mea_base.modeling_mea", fromlist=["x"]), __import__("mea_base.cache_mea", fromlist=["x"]),
            __import__("mea_base.configuration_mea", fromlist=["x"]))  # fmt: skip


def bench_args(args) -> argparse.Namespace:
    return argparse.Namespace(vocab=32000, hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=12,
                              contexts=args.contexts, new_tokens=args.new_tokens, seed=0, attn="sdpa",
                              dtype="float32")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git revision whose MEA code is the A side")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--heads-fraction", type=int, default=2, choices=[2, 4], help="h' = h / this")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = bench_args(args)
    row = {2: "mea_half_auto", 4: "mea_quarter_auto"}[args.heads_fraction]
    with tempfile.TemporaryDirectory() as folder:
        modeling, cache_module, configuration = load_base(args.base, Path(folder))
        models = {"llama": build("llama", settings), "mea_float": build(row, settings)}
        models["int8_new"] = models["mea_float"]
        config = configuration.MEAConfig(**models["mea_float"].config.to_dict())
        config._attn_implementation = "sdpa"
        models["int8_base"] = modeling.MEAForCausalLM(config).eval()
        models["int8_base"].load_state_dict(models["mea_float"].state_dict())
        caches = {"llama": lambda: None, "mea_float": lambda: None,
                  "int8_new": lambda: MEAQuantizedCache(models["int8_new"].config),
                  "int8_base": lambda: cache_module.MEAQuantizedCache(config)}  # fmt: skip
        results = {"base": args.base, "heads": f"h/{args.heads_fraction}", "contexts": {}}
        for context in args.contexts:
            states, rounds = {}, {name: [] for name in models}
            for name, model in models.items():
                states[name] = prefill(model, context, seed=0, cache=caches[name]())
                time_decode(model, *states[name], 1)  # warm-up
                states[name][0].crop(-1)
            load_before = os.getloadavg()
            names = list(models)
            for index in range(args.repeats):
                for name in names[index % len(names) :] + names[: index % len(names)]:
                    seconds = time_decode(models[name], *states[name], args.new_tokens)
                    states[name][0].crop(-args.new_tokens)
                    rounds[name].append(args.new_tokens / seconds)
            speeds = {name: median(values) for name, values in rounds.items()}
            paired = median(new / old for new, old in zip(rounds["int8_new"], rounds["int8_base"]))
            results["contexts"][context] = {
                "tokens_per_s": speeds, "x_llama": {name: s / speeds["llama"] for name, s in speeds.items()},
                "int8_new_over_base_paired": paired, "rounds": rounds,
                "load_average": [load_before, os.getloadavg()],
            }  # fmt: skip
            print(f"context {context}: " + ", ".join(f"{n} {s:.2f} tok/s ({s / speeds['llama']:.2f}x Llama)"
                                                     for n, s in speeds.items())
                  + f"; int8 new/base (paired median) {paired:.2f}; load {load_before} -> {os.getloadavg()}",
                  flush=True)  # fmt: skip
            del states
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
