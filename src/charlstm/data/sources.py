"""Which files a `--text` names: one file, every file under a folder, or the files a glob matches.

A run may train on many files (a folder of poems, a source tree). `--text` is repeatable and each
value is one of:

- a **file**, used as it is (its problems are errors, exactly as for a single text);
- a **folder**: every regular file under it, recursively, in path order (compared name by name, as
  a tree listing shows them); hidden files and folders (a name starting with ``.``, such as
  ``.git``) are left out, and symbolic links to folders are not followed (they could loop);
- a **glob** (a value with ``*``, ``?`` or ``[`` that is not an existing path): the files it
  matches, sorted; ``**`` matches any depth (``linux/**/*.c``). Like the shell, ``*`` does not
  match hidden names. Quote it so that the shell leaves it to charlstm.

The files become one corpus, one *document* each, in the order given (and in path order within a
folder or a glob); a file named twice (say by a folder and by a glob) is read once, where it first
appears. The order is deterministic, so the same `--text` always gives the same corpus and ids.

Files found in a folder or by a glob (not named on their own) are held to a looser standard, since
a source tree is not curated text: an empty file is skipped silently (an empty ``__init__.py``), and
with ``skip_bad_files`` a file that is binary or not valid in the encoding is skipped with a count
instead of stopping. Without it, such a file is a one-line error naming it: training on a tree
whose files are half Latin-1 should be a decision, not a surprise.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from charlstm.errors import UserError

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class TextFile:
    """One file of a corpus and whether it was named on its own (its problems always errors) or
    found in a folder or by a glob (an empty one is skipped, a bad one may be)."""

    path: Path
    named: bool


def text_specs(text: str | Sequence[str] | None) -> list[str]:
    """A `text` setting (one value, or many) as a list of values."""
    if text is None:
        return []
    if isinstance(text, str | os.PathLike):
        return [os.fspath(text)]
    return [os.fspath(t) for t in text]


def is_glob(spec: str) -> bool:
    """Whether `spec` is a pattern (rather than a path): it has a glob character and no file or
    folder has that exact name."""
    return bool(_GLOB_CHARS & set(spec)) and not os.path.exists(spec)


def _folder_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, hidden names left out, in tree order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # pruned: never entered
        for name in sorted(files):
            path = Path(root, name)
            if not name.startswith(".") and path.is_file():
                found.append(path)
    # os.walk visits a folder's files before its subfolders'; order by path parts instead, so that
    # the order does not depend on whether a name is a file or a folder.
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def expand(text: str | Sequence[str] | None) -> list[TextFile]:
    """The files `text` names, in corpus order (see the module docstring). A value that matches
    nothing, or a folder without files, is a `UserError` naming it."""
    files: list[TextFile] = []
    seen: set[Path] = set()
    for spec in text_specs(text):
        if not spec:
            raise UserError("--text was given an empty path; give a file, a folder or a glob")
        if is_glob(spec):
            matches = sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if p.is_file())
            if not matches:
                raise UserError(
                    f"no file matches --text {spec!r}; check the pattern (quote it so that the "
                    "shell passes it to charlstm as it is)"
                )
            found = [TextFile(p, named=False) for p in matches]
        elif Path(spec).is_dir():
            paths = _folder_files(Path(spec))
            if not paths:
                raise UserError(
                    f"the folder {spec!r} holds no files (hidden ones are left out); give a "
                    "folder with text files in it"
                )
            found = [TextFile(p, named=False) for p in paths]
        else:
            found = [TextFile(Path(spec), named=True)]  # read_text says what is wrong with it
        for f in found:
            key = Path(os.path.abspath(f.path))
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def label(text: str | Sequence[str] | None) -> str:
    """A short name for what `text` names, for logs and meta.json: the value itself, or the first
    values and how many more."""
    specs = text_specs(text)
    if len(specs) <= 3:
        return " ".join(specs)
    return f"{' '.join(specs[:2])} (and {len(specs) - 2} more)"


def no_text_error(name: str, skipped: int) -> UserError:
    """Every file `--text` named was empty (or skipped as bad)."""
    why = f" or was skipped ({skipped} binary or undecodable)" if skipped else ""
    return UserError(f"no text in --text {name}: every file is empty{why}; give files with text")
