"""A non-editable install works: build the wheel, install it into a fresh virtual environment and use it from a folder
outside the checkout (package data such as model configs, lm-eval tasks and the model-card template included).

The fresh environment borrows this environment's third-party packages through a `.pth` line (installing torch and
transformers again would take minutes); mea_hf itself comes only from the wheel, which the test checks."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(command: list, cwd: Path, env: dict) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, mea command, work folder, environment) of a fresh venv with only the wheel of mea-hf installed."""
    root = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": "", "MEA_HF_CACHE": str(root / "cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip
    source = root / "source"  # a copy, so that building leaves nothing (build/, *.egg-info) in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source],
         root, env)  # fmt: skip
    (wheel,) = (root / "dist").glob("mea_hf-*.whl")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).strip()
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], root, env)
    work = root / "work"
    work.mkdir()
    return python, root / "venv" / "bin" / "mea", work, env


@pytest.mark.slow
def test_the_installed_package_comes_from_the_wheel(installed):
    python, _, work, env = installed
    script = "import json, mea_hf, mea_hf.resources as r; print(json.dumps([mea_hf.__file__, str(r.resource_dir('models'))]))"
    package, models = json.loads(_run([python, "-c", script], work, env))
    assert Path(package).is_relative_to(python.parent.parent) and not Path(package).is_relative_to(REPO)
    assert (Path(models) / "tiny-mea.json").is_file()


@pytest.mark.slow
def test_quickstart_smoke_save_folder_and_eval_from_the_wheel(installed):
    python, mea, work, env = installed
    _run([mea, "quickstart", "--smoke", "--out", work / "quickstart", "--no-progress"], work, env)
    assert (work / "quickstart" / "results.json").is_file()

    script = """
import json, torch, mea_hf
from transformers import AutoModelForCausalLM
from mea_hf.hub import save_folder
config = mea_hf.MEAConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_component_heads=1)
model = mea_hf.MEAForCausalLM(config).eval()
tokenizer = __import__("transformers").AutoTokenizer.from_pretrained("quickstart/mea/final")
folder = save_folder(model, "saved", tokenizer, card={"how_made": "wheel test"})
loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = torch.tensor([[5, 6, 7]])
with torch.no_grad():
    same = torch.equal(loaded(ids).logits, model(ids).logits)
print(json.dumps({"same": same, "card": "wheel test" in (folder / "README.md").read_text()}))
"""
    result = json.loads(_run([python, "-c", script], work, env).strip().splitlines()[-1])
    assert result == {"same": True, "card": True}
    table = _run([mea, "eval", work / "saved", "--limit", "2", "--out", work / "eval.json"], work, env)
    assert "mea_next_line" in table
    assert set(json.loads((work / "eval.json").read_text())["results"]) >= {"mea_heldout_ppl", "mea_next_line"}
