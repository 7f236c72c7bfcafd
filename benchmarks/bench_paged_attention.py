"""One MEA layer's attention over a continuous-batching (paged) batch: reconstruct vs absorb vs the MQA form.

A paged forward packs all its sequences into one row block: T query rows (one per decoding sequence, plus the chunk of
any prefilling one) against the S read-back cached tokens of all of them, with a block-diagonal causal mask (what
transformers' SDPA/eager paged path does on CPU). Three exact ways to attend over h' cached component heads:

- reconstruct: `compose_heads` to h virtual heads (h*h'*S*d multiply-adds), then the stock SDPA attention;
- absorb: `absorbed_attention` (h' score matmuls and h' value matmuls with all H*T query rows);
- mqa: multi-query attention with one KV head of width h'*d (components concatenated; W_k and the scale folded into
  the queries, W_v applied to the output), one stock `scaled_dot_product_attention` call.

Prints and writes (JSON, Markdown) the median time per call and each path's largest deviation from reconstruct.

    python benchmarks/bench_paged_attention.py --out runs/bench_paged_attention
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mea_hf.modeling_mea import absorbed_attention, compose_heads
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.tables import markdown_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_paged_attention")
    parser.add_argument("--heads", type=int, default=8, help="query heads H = KV heads h (MHA)")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--components", type=int, nargs="+", default=[4, 2, 1], help="h' values")
    parser.add_argument("--context", type=int, default=100, help="cached tokens of every decoding sequence")
    parser.add_argument("--decoding", type=int, nargs="+", default=[1, 4, 12, 20], help="decoding sequences")
    parser.add_argument("--prefill", type=int, default=128, help="tokens of one prefill chunk in the mixed batch")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing per path and batch")
    return parser.parse_args(argv)


class _Module:  # what sdpa_attention_forward reads from the attention module
    num_key_value_groups = 1
    is_causal = True


def packed_mask(query_lens: list[int], key_lens: list[int]) -> torch.Tensor:
    """The additive (1, 1, T, S) mask of a packed paged batch: each sequence sees its own cached tokens, causally."""
    mask = torch.full((1, 1, sum(query_lens), sum(key_lens)), torch.finfo(torch.float32).min)
    row = col = 0
    for q_len, k_len in zip(query_lens, key_lens):
        for i in range(q_len):
            mask[0, 0, row + i, col : col + k_len - q_len + i + 1] = 0
        row, col = row + q_len, col + k_len
    return mask


def paths(query, key_components, value_components, hlc_k, hlc_v, mask, scaling):
    heads, head_dim = query.shape[1], query.shape[3]
    num_components, kv_len, query_len = key_components.shape[1], key_components.shape[2], query.shape[2]

    def reconstruct():
        key, value = compose_heads(key_components, hlc_k), compose_heads(value_components, hlc_v)
        return sdpa_attention_forward(_Module(), query, key, value, mask, scaling=scaling)[0]

    def absorb():
        return absorbed_attention(query, key_components, value_components, hlc_k, hlc_v, mask, scaling, 1)[0]

    def mqa():
        width = num_components * head_dim
        key = key_components.transpose(1, 2).reshape(1, 1, kv_len, width).expand(1, heads, kv_len, width)
        value = value_components.transpose(1, 2).reshape(1, 1, kv_len, width).expand(1, heads, kv_len, width)
        fold = (hlc_k.t() * scaling)[None, :, None, :, None]  # (1, H, 1, h', 1)
        folded = (query.unsqueeze(3) * fold).reshape(1, heads, query_len, width)
        out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=1.0)
        out = (out.view(1, heads, query_len, num_components, head_dim) * hlc_v.t()[None, :, None, :, None]).sum(3)
        return out.transpose(1, 2)

    return {"reconstruct": reconstruct, "absorb": absorb, "mqa": mqa}


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
    torch.manual_seed(0)
    heads, head_dim = args.heads, args.head_dim
    batches = [([1] * n, [args.context] * n) for n in args.decoding]
    batches.append(([1] * 6 + [args.prefill], [args.context] * 6 + [args.prefill]))  # decodes and a prefill chunk
    rows = []
    for num_components in args.components:
        hlc_k, hlc_v = torch.randn(num_components, heads), torch.randn(num_components, heads)
        for query_lens, key_lens in batches:
            query_len, kv_len = sum(query_lens), sum(key_lens)
            query = torch.randn(1, heads, query_len, head_dim)
            key_components = torch.randn(1, num_components, kv_len, head_dim)
            value_components = torch.randn(1, num_components, kv_len, head_dim)
            mask = packed_mask(query_lens, key_lens)
            functions = paths(query, key_components, value_components, hlc_k, hlc_v, mask, head_dim**-0.5)
            reference = functions["reconstruct"]()
            row = {"components": num_components, "sequences": len(query_lens), "T": query_len, "S": kv_len}
            for name, function in functions.items():
                row[f"{name}_ms"] = median_ms(function, args.seconds)
                row[f"{name}_max_abs_diff"] = (function() - reference).abs().max().item()
            rows.append(row)
            print({key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()})
    header = ["h'", "sequences", "T x S", "reconstruct ms", "absorb ms", "mqa ms", "max |diff| absorb, mqa"]
    table = markdown_table(
        header,
        [
            [r["components"], r["sequences"], f"{r['T']} x {r['S']}", f"{r['reconstruct_ms']:.2f}",
             f"{r['absorb_ms']:.2f} ({r['absorb_ms'] / r['reconstruct_ms']:.2f}x)",
             f"{r['mqa_ms']:.2f} ({r['mqa_ms'] / r['reconstruct_ms']:.2f}x)",
             f"{r['absorb_max_abs_diff']:.1e}, {r['mqa_max_abs_diff']:.1e}"]
            for r in rows
        ],
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"args": vars(args), "rows": rows})
    atomic_write_text(out / "table.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
