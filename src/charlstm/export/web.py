"""The web export: a static folder that generates in the browser, with no server and no network.

`export_web(run, out)` writes into `out`:

- ``index.html``, ``style.css``, ``app.js``: the page, with the served page's controls (start text,
  temperature, length, Generate and Stop) and its look;
- ``charlstm.js``: the model step (LSTM, GRU or RNN, any number of layers) and the sampler in plain
  JavaScript over typed arrays, about 10 KB;
- ``model.js``: the vocabulary, the shapes and the float32 weights (base64) as
  ``window.CHARLSTM_MODEL``. A script, not a binary file: a page opened from disk (file://) may not
  fetch() a file beside it, but it may load a <script>;
- ``charlstm-web.json``: the sha256 of each file above, so that `force` replaces only files an
  earlier export wrote (and left unchanged).

Why a script of our own rather than onnxruntime-web: one step of these models is a few matrix-vector
products (the lab's model: ~100 k multiply-adds a character), which plain JavaScript runs at
thousands of characters a second (docs/benchmarks.md), while onnxruntime-web ships megabytes of
WebAssembly that a page on file:// cannot even load (its .wasm files are fetched). The assets are
in ``export/web/``, next to this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from charlstm.atomic import atomic_write_bytes
from charlstm.errors import UserError
from charlstm.generate.textmodel import TextModel, load

ASSETS = Path(__file__).with_name("web")
PAGE_FILES = ("index.html", "style.css", "app.js", "charlstm.js")
MODEL_FILE = "model.js"
MANIFEST = "charlstm-web.json"
FILES = (*PAGE_FILES, MODEL_FILE)
FORMAT, VERSION = "charlstm-web", 1


def model_spec(model: TextModel) -> dict:
    """What the page needs of a model, as JSON: its name and validation loss, the vocabulary, the
    shapes, and every weight as one base64 string of little-endian float32 with each tensor's
    (offset in floats, shape)."""
    net = model.model
    config = net.config
    tensors, chunks, offset = {}, [], 0
    for name, t in net.state_dict().items():
        if not name.startswith(("encoder.", "rnn.", "fc.")):
            continue
        a = t.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False)
        tensors[name] = [offset, list(a.shape)]
        chunks.append(a.reshape(-1))
        offset += a.size
    weights = np.concatenate(chunks).tobytes()
    val_loss = model.val_loss
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": model.name,
        "val_loss": val_loss,
        "val_bits_per_char": None if val_loss is None else val_loss / math.log(2),
        "cell": config.cell,
        "num_layers": config.num_layers,
        "embedding_size": config.embedding_size,
        "hidden_size": config.hidden_size,
        "vocab": model.vocab.to_list(),
        "tensors": tensors,
        "weights": base64.b64encode(weights).decode("ascii"),
    }


def model_script(spec: dict) -> bytes:
    """model.js: the spec as one JavaScript assignment (JSON with every non-ASCII character escaped,
    so the file is ASCII whatever the vocabulary)."""
    head = (
        f"// The model {json.dumps(spec['name'])} for charlstm's web page "
        "(charlstm export --format web): its vocabulary, shapes and float32 weights.\n"
    )
    return (head + "window.CHARLSTM_MODEL = " + json.dumps(spec) + ";\n").encode("ascii")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _earlier_export(out: Path) -> dict[str, list[str]]:
    """The files an earlier export wrote into `out` and their hashes, from its manifest; {} when
    there is no readable manifest."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return {}
    files = manifest.get("files")
    if not isinstance(files, dict):
        return {}
    return {
        name: hashes
        for name, hashes in files.items()
        if isinstance(hashes, list) and all(isinstance(h, str) for h in hashes)
    }


def _check_out(out: Path, force: bool) -> dict[str, list[str]]:
    """Refuse an `out` where writing could lose something; returns the earlier export's files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder for the web page")
    if not out.is_dir() or not any(out.iterdir()):
        return {}
    if not force:
        raise UserError(
            f"--out {str(out)!r} is not empty; give a new or empty folder, or pass --force to "
            "replace the files of an earlier web export there"
        )
    earlier = _earlier_export(out)
    if not earlier:
        raise UserError(
            f"--out {str(out)!r} is not empty and holds no earlier web export ({MANIFEST} is "
            "missing); --force replaces only an export's own files: give a new or empty folder"
        )
    for name in FILES:
        path = out / name
        if path.is_symlink() or path.exists():
            ours = path.is_file() and not path.is_symlink()
            if not ours or _sha256(path.read_bytes()) not in earlier.get(name, []):
                raise UserError(
                    f"--out {str(out)!r} holds {name}, which the earlier web export did not write "
                    "or which was changed since; move it away or give another --out"
                )
    return earlier


def _manifest(files: dict[str, list[str]]) -> bytes:
    body = {"format": FORMAT, "version": VERSION, "files": files}
    return (json.dumps(body, indent=2) + "\n").encode("utf-8")


def export_web(
    run: str | Path | TextModel,
    out: str | Path,
    *,
    force: bool = False,
    which: str = "best",
) -> list[Path]:
    """Write the web page of a run (its `which` checkpoint; or of a loaded `TextModel`) into the
    folder `out`, which must be new or empty, or with `force` hold an earlier web export, whose
    files alone are replaced. Returns the paths written."""
    out = Path(out)
    earlier = _check_out(out, force)
    model = run if isinstance(run, TextModel) else load(run, which=which, device="cpu")
    contents = {name: (ASSETS / name).read_bytes() for name in PAGE_FILES}
    contents[MODEL_FILE] = model_script(model_spec(model))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create --out {str(out)!r} ({exc.strerror or exc}); choose a folder you can "
            "write to"
        ) from None
    new = {name: [_sha256(data)] for name, data in contents.items()}
    # The manifest first names both versions of each file, so that a crash half-way leaves a folder
    # that --force still recognises; each file is replaced whole (atomic), then the manifest.
    steps = [
        (MANIFEST, _manifest({n: sorted(set(earlier.get(n, [])) | set(new[n])) for n in FILES})),
        *contents.items(),
        (MANIFEST, _manifest(new)),
    ]
    for name, data in steps:
        try:
            atomic_write_bytes(out / name, data)
        except OSError as exc:
            raise UserError(
                f"could not write {out / name} ({exc.strerror or exc}); free some disk space and "
                "export again with --force"
            ) from None
    return [out / name for name in (*FILES, MANIFEST)]
