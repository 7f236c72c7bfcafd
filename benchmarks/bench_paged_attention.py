"""One MEA layer's attention over a continuous-batching (paged) batch: the packed calls against per-sequence ones.

A paged forward packs all its sequences into one row block: T query rows (one per decoding sequence, plus the chunk of
any prefilling one) against the S read-back cached tokens of all of them, with the block-diagonal causal mask the
engine builds. Four exact ways to attend over h' cached component heads (token-major, as the paged cache returns
them):

- packed reconstruct: `compose_heads` to h virtual heads, then transformers' SDPA over the whole T x S block (the
  stock path, and MEA's default before per-sequence attention);
- packed absorb: `absorbed_attention` over the whole block (`kv_decode="absorb"`);
- per-sequence reconstruct: `compose_heads`, then `per_sequence_sdpa` (`kv_decode="reconstruct"`);
- per-sequence auto: `MEAAttention._per_sequence_component_attention` (`kv_decode="auto"`): decoding rows read the
  components as one h'·d-wide KV head, prefill chunks compose their own sequence.

The per-sequence paths are timed at every batch size here; in the model they run only for batches of more than
`mea_hf.paged_attention.PACKED_MAX_SEQUENCES` sequences, the crossover this benchmark measures.

Prints and writes (JSON, Markdown) the median time per call, as a ratio to packed reconstruct, and each path's
largest deviation from it.

    python benchmarks/bench_paged_attention.py --out runs/bench_paged_attention
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.generation.continuous_batching.utils import build_attention_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mea_hf import paged_attention
from mea_hf.configuration_mea import MEAConfig
from mea_hf.modeling_mea import MEAAttention, absorbed_attention, compose_heads
from mea_hf.paged_attention import per_sequence_sdpa
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.tables import markdown_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_paged_attention")
    parser.add_argument("--heads", type=int, default=8, help="query heads H = KV heads h (MHA)")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--components", type=int, nargs="+", default=[4, 2, 1], help="h' values")
    parser.add_argument("--context", type=int, default=100, help="cached tokens of every decoding sequence")
    parser.add_argument("--decoding", type=int, nargs="+", default=[1, 4, 12, 20, 36], help="decoding sequences")
    parser.add_argument("--prefill", type=int, default=128, help="tokens of one prefill chunk in the mixed batch")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing per path and batch")
    return parser.parse_args(argv)


PATHS = ["packed_reconstruct", "packed_absorb", "per_sequence_reconstruct", "per_sequence_auto"]


class _Module:  # what sdpa_attention_forward reads from the attention module
    num_key_value_groups = 1
    is_causal = True


def packed_batch(query_lens: list[int], key_lens: list[int]):
    """The engine's additive (1, 1, T, S) mask of a packed batch and its cumulative query and key lengths."""
    cu_q, cu_k = [0], [0]
    for q_len, k_len in zip(query_lens, key_lens):
        cu_q.append(cu_q[-1] + q_len)
        cu_k.append(cu_k[-1] + k_len)
    mask = torch.full((1, 1, cu_q[-1], cu_k[-1]), torch.finfo(torch.float32).min)
    build_attention_mask(mask, cu_q, cu_k)
    return mask, torch.tensor(cu_q), torch.tensor(cu_k)


def attention_layer(heads: int, head_dim: int, num_components: int) -> MEAAttention:
    """One MEA attention layer (MHA, h' components) with random, non-identity mixing."""
    config = MEAConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads,
        num_component_heads=num_components, num_hidden_layers=1, vocab_size=16,
    )  # fmt: skip
    layer = MEAAttention(config, layer_idx=0)
    with torch.no_grad():
        layer.hlc_k.normal_(), layer.hlc_v.normal_()
    return layer.eval()


def paths(layer, query, key_components, value_components, mask, cu_q, cu_k):
    hlc_k, hlc_v = layer.mixing()
    scaling, lengths = layer.scaling, {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k}

    def composed():
        return compose_heads(key_components, hlc_k), compose_heads(value_components, hlc_v)

    return {
        "packed_reconstruct": lambda: sdpa_attention_forward(_Module(), query, *composed(), mask, scaling=scaling)[0],
        "packed_absorb": lambda: absorbed_attention(
            query, key_components, value_components, hlc_k, hlc_v, mask, scaling, 1
        )[0],
        "per_sequence_reconstruct": lambda: per_sequence_sdpa(None, query, *composed(), mask, scaling, **lengths)[0],
        "per_sequence_auto": lambda: layer._per_sequence_component_attention(
            query, key_components, value_components, (hlc_k, hlc_v), mask, **lengths
        ),
    }


def median_ms(function, seconds: float) -> float:
    function()
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    paged_attention.PACKED_MAX_SEQUENCES = 0  # time the per-sequence paths at every batch size: where they win is
    # what sets that threshold
    torch.manual_seed(0)
    heads, head_dim = args.heads, args.head_dim
    batches = [([1] * n, [args.context] * n) for n in args.decoding]
    batches.append(([1] * 6 + [args.prefill], [args.context] * 6 + [args.prefill]))  # decodes and a prefill chunk
    rows = []
    for num_components in args.components:
        layer = attention_layer(heads, head_dim, num_components)
        for query_lens, key_lens in batches:
            mask, cu_q, cu_k = packed_batch(query_lens, key_lens)
            query = torch.randn(1, heads, sum(query_lens), head_dim)
            key_components, value_components = (
                torch.randn(sum(key_lens), num_components, head_dim).transpose(0, 1)[None] for _ in "kv"
            )
            with torch.no_grad():
                functions = paths(layer, query, key_components, value_components, mask, cu_q, cu_k)
                reference = functions["packed_reconstruct"]()
                row = {"components": num_components, "sequences": len(query_lens), "T": sum(query_lens),
                       "S": sum(key_lens)}  # fmt: skip
                for name, function in functions.items():
                    row[f"{name}_ms"] = median_ms(function, args.seconds)
                    row[f"{name}_max_abs_diff"] = (function() - reference).abs().max().item()
            rows.append(row)
            print({key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()})
    names = [name for name in PATHS if name != "packed_reconstruct"]
    header = ["h'", "sequences", "T x S", "packed reconstruct ms", *[f"{name.replace('_', ' ')} ms" for name in names],
              "max abs diff"]  # fmt: skip
    table = markdown_table(
        header,
        [
            [r["components"], r["sequences"], f"{r['T']} x {r['S']}", f"{r['packed_reconstruct_ms']:.2f}",
             *[f"{r[f'{n}_ms']:.2f} ({r[f'{n}_ms'] / r['packed_reconstruct_ms']:.2f}x)" for n in names],
             f"{max(r[f'{n}_max_abs_diff'] for n in names):.1e}"]
            for r in rows
        ],
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"args": vars(args), "rows": rows})
    atomic_write_text(out / "table.md", table + "\n")
    print(table)
    print(f"1-minute load average after the run: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
