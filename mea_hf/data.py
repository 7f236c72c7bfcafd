"""Training data: documents in, fixed-length token blocks out.

(Initial version; the pretraining recipe extends it with `datasets`-backed loading and caching while keeping these
function signatures.)
"""

import torch

from .corpus import builtin_corpus


def load_documents(source: str | None = None, split: str = "train") -> list[str]:
    """Documents of `split` ("train" or "validation"). `source` None means the built-in corpus."""
    if source not in (None, "builtin"):
        raise ValueError(f"unsupported data source {source!r}")
    return builtin_corpus()[split]


def pack_blocks(tokenizer, documents: list[str], block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise `documents`, join them with the EOS token and cut the stream into (n, block_size) blocks."""
    stream: list[int] = []
    for text in documents:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
        if max_blocks is not None and len(stream) >= max_blocks * block_size:
            break
    n_blocks = len(stream) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"the data has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
