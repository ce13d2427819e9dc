"""Writing a set of output files so that none is ever half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

EXECUTABLE_SUFFIXES = (".sh", ".sbatch")


def write_atomically(out_dir: Path, files: dict[str, str]) -> None:
    """Write ``files`` under ``out_dir`` so that no file is ever half-written.

    Everything is first written (and fsynced) into a temporary directory next
    to ``out_dir`` (same file system), then each file is moved into place with
    ``os.replace``, an atomic rename. Shell scripts get mode 755, others 644."""
    out_dir = Path(out_dir)
    for name in files:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"launch file name {name!r} must be relative and stay inside the output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name, text in files.items():
            _write_synced(staging / name, text, 0o755 if name.endswith(EXECUTABLE_SUFFIXES) else 0o644)
        for name in files:
            target = out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_synced(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(text.encode("utf-8"))  # bytes: no platform newline translation
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)
