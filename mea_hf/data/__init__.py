"""Text and token data: the built-in corpus (`corpus.py`), loading any source through `datasets` and packing it
into cached token blocks (`loading.py`), and local tokenizer training (`tokenizer.py`)."""

from .corpus import builtin_corpus
from .loading import cached_blocks, cached_tokenizer, load_text, pack_blocks, token_blocks
from .tokenizer import train_tokenizer

__all__ = ["builtin_corpus", "cached_blocks", "cached_tokenizer", "load_text", "pack_blocks", "token_blocks", "train_tokenizer"]
