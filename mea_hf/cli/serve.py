"""`mea serve FOLDER`: an OpenAI-compatible server for an MEA folder: transformers' own `transformers serve` app and its
continuous batching (whose paged cache holds MEA's component heads, docs/serving.md), with the model resolved.

`transformers serve` loads a model with `getattr(transformers, config.architectures[0])`, which has no MEA class;
this command makes `transformers.MEAForCausalLM` (and the other MEA classes) name mea_hf's, then runs the same app.
"""

from pathlib import Path

from ..hub.folders import check_model_folder


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="MEA model folder with a tokenizer (a chat template for /v1/chat/completions)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="e.g. auto, cpu, cuda:0")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    parser.add_argument(
        "--no-continuous-batching", action="store_true", help="serve with per-request generate() instead"
    )
    parser.add_argument("--cb-num-blocks", type=int, help="paged cache size in blocks (default: from free memory)")
    parser.add_argument("--cb-page-size", type=int, help="tokens per page")
    parser.add_argument("--cb-max-batch-tokens", type=int, help="most tokens in one forward")
    parser.add_argument("--cb-max-memory-percent", type=float, help="fraction of free memory for the paged cache")
    parser.add_argument("--log-level", default="warning")


def register_mea_architectures() -> None:
    """Make `getattr(transformers, "MEAForCausalLM")` (how `transformers serve` resolves a config's architecture)
    return mea_hf's classes. Idempotent; the Auto classes are registered by `import mea_hf` already."""
    import transformers

    import mea_hf

    for name in ("MEAConfig", "MEAModel", "MEAForCausalLM", "MEAForSequenceClassification"):
        setattr(transformers, name, getattr(mea_hf, name))


def build_server(args, non_blocking: bool = False):
    """transformers' `Serve` for `args.folder`, preloaded, with continuous batching unless turned off."""
    folder = Path(args.folder)
    check_model_folder(folder, mea_only=True, what="folder")
    from transformers.cli.serve import Serve
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ValueError("`mea serve` needs fastapi, uvicorn, pydantic and openai: pip install 'mea-hf[serve]'")
    register_mea_architectures()
    server = Serve(
        force_model=str(folder.resolve()), continuous_batching=not args.no_continuous_batching, device=args.device,
        dtype=args.dtype, host=args.host, port=args.port, log_level=args.log_level, non_blocking=non_blocking,
        **_cb_options(args),
    )  # fmt: skip
    return server


def _cb_options(args) -> dict:
    return {
        name: value
        for name, value in {
            "cb_num_blocks": args.cb_num_blocks,
            "cb_block_size": args.cb_page_size,
            "cb_max_batch_tokens": args.cb_max_batch_tokens,
            "cb_max_memory_percent": args.cb_max_memory_percent,
        }.items()
        if value is not None
    }


def run(args) -> int:
    build_server(args)  # blocks until the server is stopped (Ctrl-C)
    return 0
