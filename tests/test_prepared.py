"""`charlstm prepare` and training from a memory-mapped corpus: the same vocabulary, ids, split and
weights as the in-memory path, at any chunk boundary."""

import json
import random

import numpy as np
import pytest

from charlstm.data import prepared
from charlstm.data.corpus import read_text, split_text
from charlstm.data.loading import prepare_data
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError
from charlstm.training.orchestrate import train
from tests.helpers import assert_same_tensors, invoke, tiny_config, tiny_flags, weights

WORDS = (  # noqa: SIM905 (the words read better as the two sentences they come from)
    "мороз и солнце день чудесный ещё ты дремлешь друг прелестный ёж "
    "the quick brown fox jumps over a lazy dog — «quoted» 1812 ✓"
).split()


def generated_corpus(path, n_bytes, seed=0, crlf=True, bom=True):
    """Random lines of Russian and English words, some CRLF and lone-CR line ends, a BOM."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        end = rng.choice(["\n", "\n", "\r\n", "\r", "\n\n"]) if crlf else "\n"
        piece = (line + end).encode("utf-8")
        parts.append(piece)
        size += len(piece)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"".join(parts))
    return path


def _in_memory(path):
    text = read_text(path)
    vocab = Vocabulary.from_text(text)
    return text, vocab, vocab.encode_array(text)


def test_prepare_matches_in_memory_path(tmp_path, monkeypatch):
    """A 2 MB generated corpus (BOM, CRLF, lone CR, Cyrillic, symbols) read in 64 KiB chunks gives
    the vocabulary of `Vocabulary.from_text`, the ids of `encode_array`, and honest checksums."""
    monkeypatch.setattr(prepared, "CHUNK_BYTES", 65536 + 1)  # odd: boundaries split characters
    src = generated_corpus(tmp_path / "big.txt", 2_000_000)
    result = prepared.prepare(src, tmp_path / "prep", val_fraction=0.05, progress=False)
    text, vocab, ids = _in_memory(src)
    corpus = prepared.open_prepared(tmp_path / "prep")
    assert corpus.vocab == vocab == result.vocab
    assert isinstance(corpus.ids, np.memmap) and corpus.ids.dtype == vocab.index_dtype
    assert np.array_equal(corpus.ids, ids)
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["length"] == len(text) and meta["split"] == len(split_text(text, 0.05)[0])
    assert meta["source_sha256"] == prepared.sha256_file(src)
    assert meta["ids_sha256"] == prepared.sha256_file(tmp_path / "prep" / "ids.bin")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_every_chunk_boundary(tmp_path, monkeypatch, chunk):
    """With tiny chunks every CRLF, BOM and multi-byte character is split somewhere: the result is
    still exactly `read_text`'s."""
    monkeypatch.setattr(prepared, "CHUNK_BYTES", chunk)
    src = tmp_path / "t.txt"
    src.write_bytes("\ufeffа\r\nб\r\rв\n\r\nё✓ x\r".encode("utf-8") * 3)
    prepared.prepare(src, tmp_path / "p", progress=False, val_fraction=0.2)
    corpus = prepared.open_prepared(tmp_path / "p")
    _, vocab, ids = _in_memory(src)
    assert corpus.vocab == vocab and np.array_equal(corpus.ids, ids)


def test_other_encoding_and_utf16_bom(tmp_path):
    """cp1251 and UTF-16 (whose codec consumes the BOM) decode as `read_text` decodes them."""
    text = "Мороз и солнце;\r\nдень чудесный!\n" * 50
    for name, encoding in (("a.txt", "cp1251"), ("b.txt", "utf-16")):
        src = tmp_path / name
        src.write_bytes(text.encode(encoding))
        prepared.prepare(
            src, tmp_path / name.replace(".txt", ""), encoding=encoding, progress=False
        )
        corpus = prepared.open_prepared(tmp_path / name.replace(".txt", ""))
        expected = read_text(src, encoding)
        assert prepared.decode_ids(corpus.vocab, corpus.ids) == expected


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "is empty"),
        (b"  \n\t\r\n", "only whitespace"),
        (b"ok text" + b"\xff\xfe" + b"x" * 10, "byte 0xff at byte offset 7"),
        (b"\x00\x01\x02" * 100, "looks binary"),
    ],
)
def test_bad_text_is_one_clear_error(tmp_path, content, needle):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        prepared.prepare(src, tmp_path / "p", progress=False)
    assert not (tmp_path / "p" / "meta.json").exists()


def test_damaged_or_foreign_folder_is_refused(tmp_path, corpus):
    prepared.prepare(corpus, tmp_path / "p", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepared.open_prepared(tmp_path / "nope")
    ids = tmp_path / "p" / "ids.bin"
    data = bytearray(ids.read_bytes())
    data[10] ^= 1
    ids.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        prepared.open_prepared(tmp_path / "p")
    ids.write_bytes(bytes(data[:-1]))
    with pytest.raises(UserError, match="bytes, expected"):
        prepared.open_prepared(tmp_path / "p")
    with pytest.raises(UserError, match="not an empty folder"):
        prepared.prepare(corpus, tmp_path / "p", progress=False)


def test_training_from_memmap_equals_training_from_text(tmp_path, corpus):
    """The prepared path never builds the corpus string, and trains bitwise the same weights."""
    prepared.prepare(corpus, tmp_path / "p", progress=False)
    cfg = tiny_config(corpus, max_steps=10)
    from_prep = cfg.replace(prepared=str(tmp_path / "p"))
    data = prepare_data(from_prep)
    assert isinstance(data.train_ids.base, np.memmap) or isinstance(data.train_ids, np.memmap)
    assert data._train_text is None  # lazy: built only if analysis asks for it
    assert data.train_text == split_text(read_text(corpus), cfg.data.val_fraction)[0]
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(from_prep, tmp_path / "b", progress=False)
    assert_same_tensors(weights(a), weights(b))


def test_resume_needs_the_same_vocabulary(tmp_path, corpus):
    prepared.prepare(corpus, tmp_path / "p", progress=False)
    other = tmp_path / "other.txt"
    other.write_text("abc abd\n" * 200, encoding="utf-8")
    prepared.prepare(other, tmp_path / "q", progress=False)
    with pytest.raises(UserError, match="different vocabulary"):
        prepare_data(
            tiny_config(corpus, prepared=str(tmp_path / "q")),
            prepared.open_prepared(tmp_path / "p").vocab,
        )


def test_cli_prepare_then_train(tmp_path, corpus):
    """Through the CLI: prepare --text, then train --prepared (no --text, no --dataset)."""
    result = invoke("prepare", "--text", corpus, "--out", tmp_path / "p", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "prepared" in result.output and "MB/s" in result.output
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--prepared",
        tmp_path / "p",
        "--out",
        run,
        "--no-progress",
        *tiny_flags(max_steps=5),
    )
    assert result.exit_code == 0, result.output
    assert (run / "last" / "checkpoint.safetensors").is_file()
    evaluated = invoke("evaluate", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["characters"] == len(split_text(read_text(corpus), 0.1)[1])
    bad = invoke("prepare", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "exactly one of" in bad.output
