"""Write the manifest of a base-corpus collection from a local git copy of its repository.

    python tools/make_manifest.py ruslit /path/to/RusLit.git
    python tools/make_manifest.py gutenberg-en /path/to/Gutenberg_Text.git

A manifest (src/charlstm/data/manifests/NAME.json) pins every file of a collection: its path in the
repository, its size and sha256, and its encoding, at one commit, so that `charlstm` can download
each file from its raw address and check it. This tool is how the committed manifests were made;
it reads the repository with git (no work tree needed) and decides which files belong (the
selection rules below: public-domain authors writing in the collection's language, no Shakespeare,
no benchmark text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

MANIFESTS = Path(__file__).resolve().parents[1] / "src" / "charlstm" / "data" / "manifests"
MAX_FILE = 4 * 1024 * 1024  # larger files are not in the store this was made from; skipped

# English: authors who wrote in English and died before 1947 (public domain wherever the term is
# the author's life + 70 years or shorter); up to PER_AUTHOR characters each, in path order, so
# that no one author dominates. Shakespeare is left out (tinyshakespeare is a benchmark text).
ENGLISH_AUTHORS = (
    "Alcott, Louisa May",
    "Alger, Horatio, Jr.",
    "Austen, Jane",
    "Barrie, J. M. (James Matthew)",
    "Baum, L. Frank (Lyman Frank)",
    "Brontë, Charlotte",
    "Burnett, Frances Hodgson",
    "Carroll, Lewis",
    "Chesterton, G. K. (Gilbert Keith)",
    "Collins, Wilkie",
    "Conrad, Joseph",
    "Darwin, Charles",
    "Defoe, Daniel",
    "Dickens, Charles",
    "Doyle, Arthur Conan",
    "Franklin, Benjamin",
    "Gibbon, Edward",
    "Hardy, Thomas",
    "Hawthorne, Nathaniel",
    "Henty, G. A. (George Alfred)",
    "Irving, Washington",
    "James, Henry",
    "Kipling, Rudyard",
    "London, Jack",
    "Melville, Herman",
    "Milton, John",
    "Nesbit, E. (Edith)",
    "Poe, Edgar Allan",
    "Pope, Alexander",
    "Scott, Walter",
    "Shelley, Mary Wollstonecraft",
    "Stevenson, Robert Louis",
    "Stoker, Bram",
    "Swift, Jonathan",
    "Thoreau, Henry David",
    "Trollope, Anthony",
    "Twain, Mark",
    "Wells, H. G. (Herbert George)",
    "Wharton, Edith",
    "Wilde, Oscar",
)
PER_AUTHOR = 700_000  # bytes, about as many characters in English
# Titles that are indexes, picture books, magazine volumes or adaptations, not the author's prose.
SKIP_WORDS = (
    "Index",
    "Drawings",
    "Illustrat",
    "Miscellany",
    "Water Colours",
    "Complete",
    "Shakespeare",  # retellings and quotations hold his lines (tinyshakespeare is a benchmark)
)

COLLECTIONS = {
    "ruslit": {
        "repo": "d0rj/RusLit",
        "language": "ru",
        "cleaner": "plain",
        "licence": "public domain (the repository's README: all works are in the public domain)",
        "description": "Russian prose and verse of the 19th and early 20th centuries (Tolstoy, "
        "Dostoevsky, Chekhov, Gogol, Turgenev, Gorky, Pushkin, Lermontov, Blok, Nekrasov, ...)",
    },
    "gutenberg-en": {
        "repo": "rcdm-uga/Gutenberg_Text",
        "language": "en",
        "cleaner": "gutenberg",
        "licence": "public domain (Project Gutenberg texts of authors who died before 1947; "
        "the Gutenberg licence text is cut off)",
        "description": "English novels, stories, essays and verse from Project Gutenberg, "
        f"{len(ENGLISH_AUTHORS)} authors who died before 1947, up to {PER_AUTHOR // 1000} k "
        "characters each",
    },
}


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout


def tree(repo: Path, commit: str) -> list[tuple[str, int, str]]:
    """(path, size, blob) of every file at `commit`; files whose size git cannot give are left
    out (they are not in the store)."""
    out = []
    for rec in git(repo, "ls-tree", "-r", "-l", "-z", commit).split(b"\0"):
        if not rec:
            continue
        meta, path = rec.split(b"\t", 1)
        _, kind, blob, size = meta.split()
        if kind == b"blob" and size.isdigit():
            out.append((path.decode("utf-8"), int(size), blob.decode()))
    return out


def encoding_of(data: bytes) -> str:
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        data.decode("cp1251")  # the one other encoding such Russian files have
        return "cp1251"


def selected(name: str, files: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    ok = [
        f
        for f in files
        if f[0].endswith(".txt") and f[1] < MAX_FILE and not any(c in f[0] for c in '\r\n"')
    ]
    if name == "ruslit":
        return ok
    chosen, per_author = [], {}
    for path, size, blob in sorted(ok):
        author = path.split("/", 1)[0]
        if author not in ENGLISH_AUTHORS or any(w in path for w in SKIP_WORDS):
            continue
        if per_author.get(author, 0) >= PER_AUTHOR:
            continue
        per_author[author] = per_author.get(author, 0) + size
        chosen.append((path, size, blob))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(COLLECTIONS))
    parser.add_argument("repo", type=Path, help="a git directory of the collection's repository")
    parser.add_argument("--commit", default="HEAD")
    args = parser.parse_args()
    info = COLLECTIONS[args.name]
    commit = git(args.repo, "rev-parse", args.commit).decode().strip()
    members, seen = [], set()
    for path, size, blob in selected(args.name, tree(args.repo, commit)):
        if blob in seen:  # the same file twice under two names
            continue
        seen.add(blob)
        data = git(args.repo, "cat-file", "blob", blob)
        members.append(
            {
                "path": path,
                "size": size,
                "sha256": hashlib.sha256(data).hexdigest(),
                "encoding": encoding_of(data),
            }
        )
    doc = {"name": args.name, "commit": commit, **info, "members": members}
    MANIFESTS.mkdir(parents=True, exist_ok=True)
    out = MANIFESTS / f"{args.name}.json"
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    total = sum(m["size"] for m in members)
    print(f"{out}: {len(members)} files, {total:,} bytes at {commit[:12]}", file=sys.stderr)


if __name__ == "__main__":
    main()
