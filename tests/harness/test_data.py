"""Data pipeline: Shakespeare-char, token files and batches, HF text (OpenWebText/C4 path), FIM, WikiText-2.

No network: downloads are served from local files through monkeypatching. Tiny-shakespeare comes
from the package (its embedded copy), the WikiText-2 sample from ``tests/data/wikitext2``; both are
copied into ``tmp_path`` (never prepared in place).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from asgo.harness import data as D
from asgo.harness.data import (ByteTokenizer, DatasetError, FIMDataset, FIMSentinels, TokenDataset, apply_fim,
                               fim_permute, load_data, load_hf_text, load_wikitext2, prepare_hf_text,
                               prepare_shakespeare_char, prepare_wikitext2, sampler_seed)
from asgo.harness.data import shakespeare
from asgo.harness.data.tokens import write_meta, write_tokens
from asgo.harness.data.wikitext import split_documents

TINY_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext2"  # the small sample (tests/data/README.md)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Any fallback cache directory lands in tmp_path, never in the user's ~/.cache."""
    monkeypatch.setenv("ASGO_DATA_DIR", str(tmp_path / "default-cache"))


@pytest.fixture
def shakespeare_dir(tmp_path) -> Path:
    """A data directory holding tiny-shakespeare's input.txt, written from the package's embedded copy."""
    data_dir = tmp_path / "data"
    (data_dir / "shakespeare_char").mkdir(parents=True)
    (data_dir / "shakespeare_char" / "input.txt").write_bytes(shakespeare.embedded_shakespeare())
    return data_dir


def _token_dir(directory: Path, tokens, vocab_size: int, split: str = "train") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    n = write_tokens(directory / f"{split}.bin", [np.asarray(tokens)])
    write_meta(directory, {"vocab_size": vocab_size, "splits": {split: n}})
    return directory


# ---------------------------------------------------------------------------------------------- paths


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ASGO_DATA_DIR", str(tmp_path / "x"))
    assert D.default_data_dir() == tmp_path / "x"
    monkeypatch.delenv("ASGO_DATA_DIR")
    assert D.default_data_dir() == Path.home() / ".cache" / "asgo" / "data"
    assert issubclass(DatasetError, FileNotFoundError)


# -------------------------------------------------------------------------------------- shakespeare


def test_shakespeare_prepare_counts_vocab_and_round_trip(shakespeare_dir):
    out = prepare_shakespeare_char(shakespeare_dir)
    assert out == shakespeare_dir / "shakespeare_char"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and len(meta["itos"]) == 65
    assert meta["splits"] == {"train": 1_003_854, "val": 111_540}
    assert (out / "train.bin").stat().st_size == 2 * 1_003_854
    assert (out / "val.bin").stat().st_size == 2 * 111_540

    raw = (out / "input.txt").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    text = raw.decode("utf-8")
    tok = D.CharTokenizer.from_dir(out)
    ids = np.concatenate([np.fromfile(out / "train.bin", dtype=np.uint16), np.fromfile(out / "val.bin", dtype=np.uint16)])
    assert tok.decode(ids) == text  # train then val is the whole text, in order
    assert tok.encode(text[:1000]) == ids[:1000].tolist()
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"

    data = load_data({"name": "shakespeare_char"}, shakespeare_dir)
    assert (len(data.train), len(data.val), data.vocab_size) == (1_003_854, 111_540, 65)


def test_shakespeare_is_cached(shakespeare_dir):
    out = prepare_shakespeare_char(shakespeare_dir)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*") if p.name != "input.txt"}
    assert prepare_shakespeare_char(shakespeare_dir) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*") if p.name != "input.txt"} == stamps

    source = out / "input.txt"  # a newer input.txt is prepared again
    source.write_text(TINY_TEXT)
    newer = max(stamps.values()) / 1e9 + 10
    os.utime(source, (newer, newer))
    prepare_shakespeare_char(shakespeare_dir)
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == len(set(TINY_TEXT))


SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # tiny-shakespeare's input.txt


def test_embedded_copy_is_tiny_shakespeare():
    raw = shakespeare.embedded_shakespeare()
    assert len(raw) == 1_115_394 and hashlib.sha256(raw).hexdigest() == SHA256 == shakespeare.SHA256
    assert raw.startswith(b"First Citizen:\nBefore we proceed any further, hear me speak.")


def test_shakespeare_without_local_copy_uses_the_embedded_one_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    data = load_data({"name": "shakespeare_char"}, tmp_path / "data")  # an empty data directory
    out = tmp_path / "data" / "shakespeare_char"
    assert data.train.path.parent == out
    assert hashlib.sha256((out / "input.txt").read_bytes()).hexdigest() == SHA256
    assert (len(data.train), len(data.val), data.vocab_size) == (1_003_854, 111_540, 65)
    assert json.loads((out / "meta.json").read_text())["source_sha256"] == SHA256


def test_read_only_data_dir_without_input_gets_the_embedded_copy_in_the_cache(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "shakespeare_char").mkdir(parents=True)
    data_dir.chmod(0o555)
    (data_dir / "shakespeare_char").chmod(0o555)
    try:
        data = load_data({"name": "shakespeare_char"}, data_dir)
        assert list((data_dir / "shakespeare_char").iterdir()) == []
        assert data.train.path.is_relative_to(tmp_path / "default-cache")
        assert hashlib.sha256((data.train.path.parent / "input.txt").read_bytes()).hexdigest() == SHA256
        assert len(data.val) == 111_540
    finally:
        (data_dir / "shakespeare_char").chmod(stat.S_IRWXU)
        data_dir.chmod(stat.S_IRWXU)


def test_damaged_embedded_copy_is_a_dataset_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shakespeare, "SHA256", "0" * 64)
    with pytest.raises(DatasetError, match="SHA-256.*reinstall"):
        prepare_shakespeare_char(tmp_path / "data")
    assert not (tmp_path / "data" / "shakespeare_char" / "input.txt").exists()


def test_empty_input_is_a_dataset_error(tmp_path):
    (tmp_path / "shakespeare_char").mkdir()
    (tmp_path / "shakespeare_char" / "input.txt").write_text("")
    with pytest.raises(DatasetError, match="is empty.*prepare shakespeare_char"):
        prepare_shakespeare_char(tmp_path)


def test_read_only_source_is_never_written(shakespeare_dir, tmp_path):
    source_dir = shakespeare_dir / "shakespeare_char"
    source_dir.chmod(0o555)
    try:
        data = load_data({"name": "shakespeare_char"}, shakespeare_dir)
        assert sorted(p.name for p in source_dir.iterdir()) == ["input.txt"]
        assert data.train.path.is_relative_to(tmp_path / "default-cache")  # the fallback cache
        assert len(data.train) == 1_003_854
        assert load_data({"name": "shakespeare_char"}, shakespeare_dir).train.path == data.train.path
    finally:
        source_dir.chmod(stat.S_IRWXU)


# ------------------------------------------------------------------------------ missing / malformed


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_data({"name": "openwebtext"}, tmp_path)
    message = str(info.value)
    assert "python -m asgo.harness.data.prepare openwebtext" in message
    assert str(tmp_path / "openwebtext") in message and "train.bin" in message
    with pytest.raises(FileNotFoundError):  # DatasetError is one
        load_data({"name": "c4"}, tmp_path)


@pytest.mark.parametrize("defect", ["odd_size", "empty", "no_meta", "count_mismatch", "id_too_large", "bad_json"])
def test_malformed_bin_is_a_dataset_error(tmp_path, defect):
    directory = _token_dir(tmp_path / "openwebtext", np.arange(100), vocab_size=100)
    path = directory / "train.bin"
    if defect == "odd_size":
        path.write_bytes(path.read_bytes() + b"\0")
    elif defect == "empty":
        path.write_bytes(b"")
    elif defect == "no_meta":
        (directory / "meta.json").unlink()
    elif defect == "count_mismatch":  # written as int32: twice the bytes meta.json accounts for
        path.write_bytes(np.arange(100, dtype=np.int32).tobytes())
    elif defect == "id_too_large":
        write_meta(directory, {"vocab_size": 50, "splits": {"train": 100}})
    elif defect == "bad_json":
        (directory / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match="python -m asgo.harness.data.prepare openwebtext"):
        TokenDataset(directory, "train", data_dir=tmp_path)


def test_load_data_rejects_unknown_names_and_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_data({"name": "imagenet"}, tmp_path)
    with pytest.raises(ValueError, match="no option"):
        load_data({"name": "shakespeare_char", "block_size": 3}, tmp_path)


# --------------------------------------------------------------------------------------- batches


@pytest.fixture
def ramp(tmp_path) -> TokenDataset:
    """Tokens 0, 1, ..., 9999: a window's content reveals its offset."""
    return TokenDataset(_token_dir(tmp_path / "ramp", np.arange(10_000), vocab_size=10_000), "train")


def test_get_batch_shapes_dtypes_and_shift(ramp):
    g = torch.Generator().manual_seed(0)
    x, y = ramp.get_batch(8, 32, g, "cpu")
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    assert torch.equal(x - x[:, :1], torch.arange(32).expand(8, 32))  # contiguous windows
    assert int(x[:, 0].min()) >= 0 and int(y[:, -1].max()) <= 9_999


def test_get_batch_is_deterministic_given_the_seed(ramp):
    def batch(seed):
        return ramp.get_batch(16, 8, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(batch(3), batch(3))
    assert not torch.equal(batch(3), batch(4))


def test_window_longer_than_split_is_a_dataset_error(tmp_path):
    ds = TokenDataset(_token_dir(tmp_path / "short", np.arange(10), vocab_size=10), "train")
    ds.get_batch(2, 9)  # exactly one window fits
    with pytest.raises(DatasetError, match="fewer than block_size"):
        ds.get_batch(2, 10)


def test_sampler_seeds_give_distinct_streams(ramp):
    seeds = {(r, w): sampler_seed(1337, r, w) for r in range(4) for w in range(4)}
    assert len(set(seeds.values())) == 16
    assert sampler_seed(1337, 2, 1) == seeds[2, 1]  # deterministic
    assert sampler_seed(1338, 0) != sampler_seed(1337, 1)  # not seed + rank
    assert all(0 <= s < 2**63 for s in seeds.values())
    starts = [ramp.get_batch(8, 4, torch.Generator().manual_seed(s))[0][:, 0] for s in seeds.values()]
    assert len({tuple(s.tolist()) for s in starts}) == 16
    assert D.LMData.sampler_seed(1337, 1) == sampler_seed(1337, 1)


# ------------------------------------------------------------------------- HF text (OWT / C4 path)


DOCS = [f"document {i}: " + "lorem ipsum " * (i % 5) + "é" * (i % 3) for i in range(40)]


@pytest.fixture
def local_text(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    return datasets.load_dataset("text", data_files={"train": str(path)}, cache_dir=str(tmp_path / "hf-cache"))


def _documents(ids: np.ndarray, eot: int) -> list[str]:
    assert ids[-1] == eot  # every document, the last included, ends with eot
    parts = np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]  # each part: a document's bytes, then eot
    return [bytes(part[:-1].astype(np.uint8)).decode() for part in parts]


def test_hf_text_prepare_on_local_fixture(tmp_path, local_text):
    out = prepare_hf_text("tinytext", tmp_path / "data", tokenizer=ByteTokenizer(), val_fraction=0.25, seed=2357,
                          num_proc=1, dataset=local_text)
    meta = json.loads((out / "meta.json").read_text())
    n_val = math.ceil(0.25 * len(DOCS))
    assert meta["documents"] == {"train": len(DOCS) - n_val, "val": n_val}
    assert (meta["vocab_size"], meta["padded_vocab_size"], meta["eot_token"]) == (257, 320, 256)
    assert (meta["val_fraction"], meta["seed"]) == (0.25, 2357)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert meta["splits"] == {"train": len(train), "val": len(val)}
    assert len(train) + len(val) == sum(len(d.encode()) + 1 for d in DOCS)  # bytes + one eot per document
    train_docs, val_docs = _documents(train, 256), _documents(val, 256)
    assert (len(train_docs), len(val_docs)) == (len(DOCS) - n_val, n_val)
    assert sorted(train_docs + val_docs) == sorted(DOCS)  # a partition of the documents

    stamp = (out / "train.bin").stat().st_mtime_ns  # cached
    prepare_hf_text("tinytext", tmp_path / "data", tokenizer=ByteTokenizer(), dataset=local_text)
    assert (out / "train.bin").stat().st_mtime_ns == stamp

    data = load_hf_text("tinytext", tmp_path / "data")
    x, y = data.train.get_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and data.vocab_size == 257


def test_hf_text_keeps_a_validation_split(tmp_path, local_text):
    import datasets

    dd = datasets.DatasetDict({"train": local_text["train"].select(range(30)),
                               "validation": local_text["train"].select(range(30, 40))})
    out = prepare_hf_text("c4like", tmp_path, tokenizer=ByteTokenizer(), num_proc=1, dataset=dd)
    assert json.loads((out / "meta.json").read_text())["documents"] == {"train": 30, "val": 10}
    assert _documents(np.fromfile(out / "val.bin", dtype=np.uint16), 256) == DOCS[30:]


def test_hf_tokenizer_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, " ": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    tok = D.get_tokenizer(tmp_path / "tok")
    assert (tok.eot_token, tok.n_vocab) == (0, 4)
    assert tok.encode_ordinary("ab a") == [1, 2, 3, 1]


# -------------------------------------------------------------------------------------------- FIM


S = FIMSentinels.after(10_000)


def test_fim_permute_psm_and_spm():
    t = torch.arange(10)
    assert fim_permute(t, 3, 7, S).tolist() == [S.prefix, 0, 1, 2, S.suffix, 7, 8, 9, S.middle, 3, 4, 5, 6]
    assert fim_permute(t, 3, 7, S, spm=True).tolist() == [S.prefix, S.suffix, 7, 8, 9, S.middle, 0, 1, 2, 3, 4, 5, 6]
    assert fim_permute(t, 0, 0, S).tolist() == [S.prefix, S.suffix, *range(10), S.middle]
    assert (S.prefix, S.suffix, S.middle, S.vocab_size) == (10_000, 10_001, 10_002, 10_003)


def _undo_psm(seq: list[int]) -> list[int]:
    """prefix + middle + suffix from <PRE> prefix <SUF> suffix <MID> middle."""
    assert seq[0] == S.prefix and seq.count(S.suffix) == 1 and seq.count(S.middle) == 1
    suf, mid = seq.index(S.suffix), seq.index(S.middle)
    return seq[1:suf] + seq[mid + 1:] + seq[suf + 1:mid]


@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_fim_rate_one_rearranges_every_sample(ramp, spm_rate):
    fim = FIMDataset(ramp, S, fim_rate=1.0, spm_rate=spm_rate)
    x, y = fim.get_batch(32, 24, torch.Generator().manual_seed(5))
    assert x.shape == y.shape == (32, 24) and torch.equal(x[:, 1:], y[:, :-1])
    for xs, ys in zip(x.tolist(), y.tolist()):
        seq = xs + ys[-1:]
        plain = [t for t in seq if t < S.prefix]
        assert sorted(seq) == sorted(plain + list(S.ids))  # the original tokens plus the 3 sentinels
        original = list(range(min(plain), min(plain) + len(plain))) if plain else []
        assert sorted(plain) == original and len(plain) == 24 + 1 - 3
        if spm_rate == 0.0:
            assert _undo_psm(seq) == original
        else:
            assert seq[:2] == [S.prefix, S.suffix]
            mid = seq.index(S.middle)
            assert seq[mid + 1:] + seq[2:mid] == original  # <PRE><SUF> suffix <MID> prefix middle


def test_fim_rate_zero_is_plain_clm(ramp):
    x, y = FIMDataset(ramp, S, fim_rate=0.0).get_batch(16, 12, torch.Generator().manual_seed(9))
    xc, yc = ramp.get_batch(16, 12, torch.Generator().manual_seed(9))
    assert torch.equal(x, xc) and torch.equal(y, yc)


def test_fim_is_deterministic_given_the_seed_and_mixes_at_half_rate(ramp):
    fim = FIMDataset(ramp, S, fim_rate=0.5)
    a = fim.get_batch(64, 16, torch.Generator().manual_seed(1))
    b = fim.get_batch(64, 16, torch.Generator().manual_seed(1))
    c = fim.get_batch(64, 16, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    n_fim = int((a[0][:, 0] == S.prefix).sum())
    assert 16 < n_fim < 48


def test_fim_middle_loss_masks_targets_before_mid(ramp):
    x, y = FIMDataset(ramp, S, fim_rate=1.0, loss="middle").get_batch(8, 16, torch.Generator().manual_seed(0))
    for xs, ys in zip(x.tolist(), y.tolist()):
        mid = (xs + ys[-1:]).index(S.middle)
        assert all(t == -100 for t in ys[:mid]) and all(t != -100 for t in ys[mid:])
    with pytest.raises(ValueError):
        apply_fim(torch.zeros(1, 8, dtype=torch.long), S, fim_rate=1.5)


# ----------------------------------------------------------------------------------------- WikiText-2


@pytest.fixture
def wikitext_dir(tmp_path) -> Path:
    """The sample's valid.txt and test.txt only, like an offline copy without the training split."""
    data_dir = tmp_path / "data"
    (data_dir / "wikitext2").mkdir(parents=True)
    for name in ("valid.txt", "test.txt"):
        shutil.copyfile(WIKITEXT / name, data_dir / "wikitext2" / name)
    for p in [data_dir / "wikitext2", *(data_dir / "wikitext2").iterdir()]:
        p.chmod(stat.S_IRWXU)
    return data_dir


def test_wikitext_documents_are_the_articles():
    for name, articles in (("train.txt", 3), ("valid.txt", 2), ("test.txt", 2)):
        text = (WIKITEXT / name).read_text(encoding="utf-8")
        docs = split_documents(text)
        assert len(docs) == articles and "".join(docs) == text
        assert all(d.lstrip(" \n").startswith("= ") for d in docs)


def test_wikitext_prepare_from_offline_copy(wikitext_dir, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError, match="train_split='test'"):  # no silent fallback to test.txt
        prepare_wikitext2(wikitext_dir, tokenizer="byte")

    out = prepare_wikitext2(wikitext_dir, tokenizer="byte", train_split="test")
    meta = json.loads((out / "meta.json").read_text())
    sizes = {s: len((WIKITEXT / f).read_text(encoding="utf-8").encode())
             for s, f in (("val", "valid.txt"), ("test", "test.txt"))}
    assert meta["documents"] == {"train": 2, "val": 2, "test": 2}
    assert meta["splits"] == {"train": sizes["test"] + 2, "val": sizes["val"] + 2, "test": sizes["test"] + 2}
    assert meta["train_split"] == "test" and meta["fim_sentinels"] == {"prefix": 257, "suffix": 258, "middle": 259}
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert prepare_wikitext2(wikitext_dir, tokenizer="byte", train_split="test") == out
    assert (out / "train.bin").stat().st_mtime_ns == stamp  # cached

    clm = load_data({"name": "wikitext2", "objective": "clm", "fim_rate": 0.5, "train_split": "test",
                     "tokenizer": "byte"}, wikitext_dir)
    fim = load_data({"name": "wikitext2", "objective": "fim", "fim_rate": 1.0, "train_split": "test",
                     "tokenizer": "byte"}, wikitext_dir)
    assert (clm.vocab_size, fim.vocab_size) == (257, 260)
    x, _ = fim.train.get_batch(4, 64, torch.Generator().manual_seed(0))
    assert (x[:, 0] == 257).all() and int(x.max()) == 259
    xv, _ = clm.val.get_batch(4, 64, torch.Generator().manual_seed(0))
    assert int(xv.max()) < 257 and clm.test is not None


def test_wikitext_prepare_with_a_training_split(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    shutil.copytree(WIKITEXT, tmp_path / "data" / "wikitext2")
    data = load_wikitext2(tmp_path / "data", "clm", tokenizer="byte")  # train.txt present: no train_split needed
    sizes = {s: len((WIKITEXT / f).read_text(encoding="utf-8").encode()) for s, f in
             (("train", "train.txt"), ("val", "valid.txt"), ("test", "test.txt"))}
    assert data.meta["documents"] == {"train": 3, "val": 2, "test": 2} and data.meta["train_split"] == "train"
    assert data.meta["splits"] == {"train": sizes["train"] + 3, "val": sizes["val"] + 2, "test": sizes["test"] + 2}


def test_wikitext_download_path(tmp_path, monkeypatch):
    import datasets

    rows = {"train": ["", " = Alpha = \n", " alpha text \n", " = Beta = \n", " beta \n"],
            "validation": [" = Gamma = \n", " gamma \n"], "test": [" = Delta = \n", " delta \n"]}
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return {split: [{"text": r} for r in split_rows] for split, split_rows in rows.items()}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_wikitext2(tmp_path, "clm", tokenizer=ByteTokenizer())
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    assert (tmp_path / "wikitext2" / "train.txt").read_text() == "\n = Alpha = \n alpha text \n = Beta = \n beta \n"
    assert data.meta["documents"] == {"train": 2, "val": 1, "test": 1}


def test_prepare_cli(shakespeare_dir, wikitext_dir, capsys):
    from asgo.harness.data.prepare import main

    assert main(["shakespeare_char", "--data-dir", str(shakespeare_dir)]) == 0
    assert "prepared" in capsys.readouterr().out
    assert main(["wikitext2", "--data-dir", str(wikitext_dir), "--tokenizer", "byte", "--train-split", "test"]) == 0


# evaluation windows (train.eval_batch_size / train.eval_full): fixed, shardable, the full pass covers every token once

def test_eval_windows_are_fixed_and_full_pass_scores_every_token_once(ramp):
    a, b = D.eval_windows(len(ramp), 32, 40), D.eval_windows(len(ramp), 32, 40)
    assert torch.equal(a.offsets, b.offsets) and len(a) == 40  # the same set at every call (a constant seed)
    assert torch.equal(D.eval_windows(len(ramp), 32, 80).offsets[:40], a.offsets)  # more windows extend the set
    for block in (64, 7, 9999):  # 9999 = 156 * 64 + 15: a tail window; 9999 = 1 * 9999: none
        full = D.eval_windows(len(ramp), block)
        x, y = ramp.eval_batch(full, torch.arange(len(full)))
        assert x.shape == y.shape == (len(full), block)
        scored = y[y != D.IGNORE_INDEX]  # the ramp's token ids are their positions
        assert torch.equal(scored.sort().values, torch.arange(1, len(ramp)))  # each target once, none missed
        assert len(scored) == len(ramp) - 1


def test_eval_window_shards_partition_the_set_and_batches_do_not_matter(ramp):
    windows = D.eval_windows(len(ramp), 16, 11)
    for world in (1, 2, 3, 4, 16):
        shards = [list(windows.shard(r, world)) for r in range(world)]
        assert sum(shards, []) == list(range(11))
    whole = ramp.eval_batch(windows, torch.arange(11))
    parts = [ramp.eval_batch(windows, torch.arange(i, min(i + 4, 11))) for i in range(0, 11, 4)]
    assert all(torch.equal(w, torch.cat(p)) for w, p in zip(whole, zip(*parts)))
    fim = FIMDataset(ramp, FIMSentinels.after(10_000), fim_rate=0.5, spm_rate=0.5)
    whole = fim.eval_batch(windows, torch.arange(11))  # FIM drawn per window: the same in any batch
    parts = [fim.eval_batch(windows, torch.arange(i, min(i + 4, 11))) for i in range(0, 11, 4)]
    assert all(torch.equal(w, torch.cat(p)) for w, p in zip(whole, zip(*parts)))
    assert 0 < int((whole[0][:, 0] == 10_000).sum()) < 11  # some windows FIM, some not
