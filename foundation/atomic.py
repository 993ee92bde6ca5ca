"""Writes that a kill cannot leave half done: build under a temporary name, then rename.

A rename within one file system is atomic, so a reader sees the old version or the new
one, never a mixture.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replace_directory(path: Path):
    """Yield an empty staging folder; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = path.parent / f".old-{path.name}-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained_atomic(model, directory: Path) -> None:
    """`model.save_pretrained(directory)`, each file renamed into place, other files kept.

    The folder also holds checkpoints and logs, so it is updated file by file; the weights
    go last, and a weights file is never half written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-save-", dir=directory) as staging:
        model.save_pretrained(staging)
        names = sorted(os.listdir(staging), key=lambda name: name.endswith(".safetensors"))
        for name in names:
            os.replace(Path(staging) / name, directory / name)
