"""Files that ship inside the package (read with `importlib.resources`, so they work from a wheel too):

    models/        model-size configs for `mea train --model NAME` (NAME.json)
    lm_eval/       the offline lm-eval tasks (YAML and their data) used by `mea eval` by default
    model_cards/   the Hub model-card template that `mea_hf.hub.save_folder` renders
"""

from importlib.resources import as_file, files
from pathlib import Path


def resource_dir(name: str) -> Path:
    """A real directory path for resource folder `name` (installed packages are plain directories on disk)."""
    with as_file(files(__name__) / name) as path:
        return Path(path)
