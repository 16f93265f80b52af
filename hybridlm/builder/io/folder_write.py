"""Writing a model folder atomically: a temporary sibling folder renamed into place, and the checks
that refuse to clobber what is already there."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from hybridlm.builder.io.folder_format import META_FILE, OWN_FILES, SPEC_FILE
from hybridlm.errors import HybridLMError

def check_save_target(folder: str | Path, *, overwrite: bool = False) -> None:
    """Refuse, before any work, a save that would clobber something (``hybridlm export`` calls it first)."""
    folder = Path(folder)
    if folder.is_symlink():
        folder = Path(os.path.realpath(folder))
    if not folder.exists():
        if folder.parent.exists() and not folder.parent.is_dir():
            raise HybridLMError(f"cannot save a model to {folder}: {folder.parent} is a file, not a folder")
        return
    if not folder.is_dir():
        raise HybridLMError(f"cannot save a model to {folder}: it is an existing file, not a folder; "
                            "give the path of a new (or empty) folder")
    try:
        entries = sorted(os.listdir(folder))
    except OSError as err:
        raise HybridLMError(f"cannot save a model to {folder}: cannot list it ({err.strerror or err})") from None
    if not entries:
        return
    foreign = [e for e in entries if e not in OWN_FILES]
    complete = (folder / META_FILE).is_file()
    incomplete = not complete and not foreign and (folder / SPEC_FILE).exists()  # an interrupted in-place save
    if not (complete or incomplete):
        raise HybridLMError(f"refusing to save a model into {folder}: the folder is not empty and is not a hybridlm "
                            f"model folder (it holds {listing(folder, entries)}); choose a new or empty folder")
    if not overwrite:
        what = "a hybridlm model folder" if complete else "an incomplete hybridlm model folder (an interrupted save?)"
        raise HybridLMError(f"{folder} already holds {what}; pass overwrite=True (`--overwrite` on the command line) "
                            "to replace it, or choose another folder")
    if foreign:
        raise HybridLMError(f"refusing to replace the model folder {folder}: besides the model it holds "
                            f"{listing(folder, foreign)}, which replacing the folder would delete; "
                            "move them out or choose another folder")


def listing(folder: Path, names: list[str], most: int = 6) -> str:
    shown = [n + ("/" if (folder / n).is_dir() else "") for n in names[:most]]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown) + more


def fsync_tree(folder: Path) -> None:
    """Flush the new files before the rename, so a crash cannot leave a renamed folder of empty files."""
    for path in [*folder.iterdir(), folder]:
        _fsync(path)


def _is_cwd(path: Path) -> bool:
    try:
        return os.path.samefile(path, os.getcwd())
    except OSError:
        return False


def move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        _fsync(target.parent)
        return
    # Renaming the working directory away would strand the process, and a mount point cannot be
    # renamed: those are filled in place instead.
    if not _is_cwd(target) and not os.path.ismount(target):
        shutil.copymode(target, tmp)
        try:
            if not any(target.iterdir()):  # an empty folder: rename over it (POSIX replaces an empty directory)
                os.replace(tmp, target)
            else:  # a model folder, overwrite=True: old aside, new in, old deleted
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            _fsync(target.parent)
            return
        except OSError:
            pass  # nothing was changed: fill it in place
    _replace_contents(tmp, target)


def _replace_contents(tmp: Path, target: Path) -> None:
    """In place, file by file: hybridlm.json goes first and comes back last, so a folder never reads as
    complete while it mixes old and new files (and spec.yaml comes first, so it stays recognisable)."""
    def remove(p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()

    remove(target / META_FILE)
    new = [p.name for p in tmp.iterdir() if p.name != META_FILE]
    for name in sorted(new, key=lambda n: n != SPEC_FILE):
        if (target / name).is_dir() and not (target / name).is_symlink():
            remove(target / name)
        os.replace(tmp / name, target / name)
    for name in OWN_FILES:
        if name not in new and name != META_FILE:
            remove(target / name)
    os.replace(tmp / META_FILE, target / META_FILE)
    _fsync(target)


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk; where the file system cannot, go on."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
