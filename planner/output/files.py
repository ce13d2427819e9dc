"""Writing loom's outputs so that none is ever half-written.

- ``write_file_set``: a folder of files (``--out``: launch files and
  plan.json, or ``loom experts``' maps) written as a set. Every file goes to a
  new folder beside the target first (same file system); then the target is
  swapped for it by renames, so the target holds the old set or the whole
  new one, never a mix: files of an earlier set that the new one lacks (a
  Megatron ``train.sh`` under a DeepSpeed plan) are gone. A folder loom did
  not write (it lists what it wrote in ``.loom-files``) is refused rather
  than replaced.
- ``write_file``: one file (a profile JSON, a figure), through a temporary
  file in the same folder renamed into place.

Every failure is a ``SpecError`` naming the flag and the path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from loom.planner.specs.errors import SpecError

EXECUTABLE_SUFFIXES = (".sh", ".sbatch")
MANIFEST = ".loom-files"


def write_file_set(out_dir: Path, files: dict[str, str], flag: str = "--out") -> None:
    """Replace the folder ``out_dir`` with exactly ``files`` (relative name
    -> text; shell scripts get mode 755, others 644)."""
    out_dir = Path(out_dir)
    for name in files:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or name == MANIFEST:
            raise ValueError(f"output file name {name!r} must be relative and stay inside the output directory")
    try:
        check_out_folder(out_dir, flag)
        parent = _writable_folder(out_dir.parent, flag)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as error:  # /proc/x, a name too long, a folder gone read-only since the check
        raise SpecError(flag, flag.lstrip("-"), f"a folder loom can write ({error.strerror or error})", str(out_dir)) from None
    try:
        for name, text in files.items():
            _write_synced(staging / name, text, 0o755 if name.endswith(EXECUTABLE_SUFFIXES) else 0o644)
        _write_synced(staging / MANIFEST, json.dumps(sorted(files), indent=1) + "\n", 0o644)
        os.chmod(staging, 0o755)
        _swap_in(staging, out_dir)
    except OSError as error:
        raise SpecError(flag, flag.lstrip("-"), f"a folder loom can write ({error.strerror or error})", str(out_dir)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file(path: Path, write: Callable[[Path], None], flag: str) -> None:
    """Write one file: ``write(temporary_path)`` fills a temporary file beside
    ``path``, which is then renamed onto it (readers see the old file or the
    whole new one)."""
    path = Path(path)
    temporary = None
    try:
        folder = check_file_target(path, flag)
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
        os.close(descriptor)
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp creates 0600
        os.replace(temporary, path)
    except OSError as error:
        raise SpecError(flag, flag.lstrip("-"), f"a file loom can write ({error.strerror or error})", str(path)) from None
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def check_file_target(path: Path, flag: str) -> Path:
    """``path`` can be written: not a folder, in a folder loom can create
    and write (which it returns)."""
    if Path(path).is_dir():
        raise SpecError(flag, flag.lstrip("-"), "a file name (it is a folder)", str(path))
    return _writable_folder(Path(path).parent, flag)


def write_text_file(path: Path, text: str, flag: str) -> None:
    """``write_file`` for text, flushed to disk before the rename."""

    def fill(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    write_file(path, fill, flag)


def check_out_folder(out_dir: Path, flag: str = "--out") -> None:
    """``out_dir`` may be replaced: absent, empty, or a set loom wrote
    (checked before a long search, and again when writing)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SpecError(flag, flag.lstrip("-"), "a folder for the output files (it is a file)", str(out_dir))
    try:
        present = {entry.name: entry for entry in out_dir.iterdir()}
        if not present:
            return
        written = set(json.loads((out_dir / MANIFEST).read_text())) if (out_dir / MANIFEST).is_file() else set()
    except (OSError, ValueError, TypeError):
        written = set()
    foreign = sorted(path for name, entry in present.items() if name != MANIFEST for path in _foreign(entry, name, written))
    if MANIFEST not in present or foreign:
        listed = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise SpecError(flag, flag.lstrip("-"), f"an empty folder or one loom wrote (it holds {listed or 'files'} that loom did not write)",
                        str(out_dir))


def _foreign(entry: Path, name: str, written: set[str]) -> list[str]:
    """What in ``entry`` (named ``name`` in the output folder) loom did not
    write: nothing for a listed file or for a folder (loom plan --trials'
    trial-K) holding only listed files; else the names of the others."""
    if entry.is_file():
        return [] if name in written else [name]
    if not entry.is_dir() or not any(listed.startswith(name + "/") for listed in written):
        return [name]
    return sorted(relative for path in entry.rglob("*") if not path.is_dir()
                  if (relative := path.relative_to(entry.parent).as_posix()) not in written)


def check_writable(path: Path, flag: str) -> None:
    """Before any work, without creating anything: ``path`` (an output
    folder or file) can be created where it is. Its nearest existing
    ancestor must be a folder in which loom can create the temporary entry
    that writing starts with (a real try, removed at once: permissions alone
    do not tell that /proc or /sys refuse new entries, or that a name is too
    long). OSError is the caller's to turn into bad input."""
    path = Path(path)
    names, ancestor = [path.name], path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        names.insert(0, ancestor.name)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SpecError(flag, flag.lstrip("-"), f"a path under a folder ({ancestor} is a file)", str(path))
    for name in names:
        os.rmdir(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=ancestor))


def _writable_folder(folder: Path, flag: str) -> Path:
    """``folder``, created if missing; a SpecError when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SpecError(flag, flag.lstrip("-"), f"a path in a folder loom can create ({error.strerror or error})", str(folder)) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(flag, flag.lstrip("-"), "a path in a folder loom can write", str(folder))
    return folder


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` onto ``out_dir``; an existing ``out_dir`` is moved
    aside first and removed after (restored if the second rename fails)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    aside.rmdir()
    os.replace(out_dir, aside)
    try:
        os.replace(staging, out_dir)
    except OSError:
        os.replace(aside, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _write_synced(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` (making its folders), on disk before returning, with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(text.encode("utf-8"))  # bytes: no platform newline translation
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)
