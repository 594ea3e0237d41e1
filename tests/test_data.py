"""`python -m tritonmoe.dsv3.data prepare`: a BPE tokenizer trained here on ~300 KB of text made here, jsonl /
jsonl.gz / txt inputs, shards that decode back to the documents exactly, the same bytes whatever the core count
or the interruptions, and `train --data DIR` reading the folder (then `generate` finding its tokenizer)."""

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from dist_utils import run_distributed
from tritonmoe.dsv3 import data
from tritonmoe.dsv3.data import TokenShards, load_corpus
from tritonmoe.dsv3 import prepare as prepare_module
from tritonmoe.dsv3.prepare import prepare

EOS, BOS = "<|endoftext|>", "<s>"
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "zé", "ü", "中", "文", "ő", "ñ", "th", "qu", "x", "🙂", "ß", "ж"]


def _documents(n: int, seed: int = 0) -> list[str]:
    """Text with what a tokenizer round trip can get wrong: multi-byte UTF-8, emoji, whitespace runs, JSON
    escapes, leading/trailing blanks, and an empty document."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(800)]
    docs = []
    for i in range(n):
        parts = [rng.choice(words) for _ in range(rng.randint(20, 160))]
        for _ in range(rng.randint(0, 4)):
            parts.insert(rng.randrange(len(parts)), rng.choice(["\n", "\n\n", "\t", '"quoted"', "a\\b", "  ", "{x}"]))
        docs.append((" " if i % 7 == 0 else "") + " ".join(parts) + rng.choice(["", "\n", " "]))
    docs[5] = ""
    return docs


def _write_tokenizer(folder: Path, docs: list[str], config: dict, extra_tokens: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS, BOS],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if extra_tokens:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three kinds of input, documents in the order prepare must read them: a.jsonl, then the folder's files in
    sorted relative-path order (b.jsonl.gz, c/ with its .txt files and one .jsonl, a file prepare ignores)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _documents(640)
    tok = _write_tokenizer(root / "tok", docs, {"eos_token": {"content": EOS, "special": True}})
    a, b, c, d = docs[:300], docs[300:500], docs[500:600], docs[600:]
    with open(root / "a.jsonl", "w") as f:
        for i, t in enumerate(a):
            f.write(json.dumps({"id": i, "text": t}) + ("\n\n" if i == 3 else "\n"))  # a blank line is skipped
    folder = root / "more"
    (folder / "c").mkdir(parents=True)
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in b))
    for i, t in enumerate(c):
        (folder / "c" / f"{i:03d}.txt").write_text(t)
    with open(folder / "c" / "zz.jsonl", "w") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in d))  # no newline after the last line
    (folder / "c" / "notes.md").write_text("not an input")
    return {"root": root, "docs": docs, "tok": tok, "inputs": [str(root / "a.jsonl"), str(folder)]}


def _split_documents(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eos_id)
    assert ends.size and ends[-1] == tokens.size - 1, "the stream must end with EOS"
    return [seg[:-1].tolist() for seg in np.split(tokens, ends + 1)[:-1]]


def _decoded(folder: Path, val_every: int) -> list[str]:
    """Every document of a prepared folder, in input order, decoded with the folder's own tokenizer copy."""
    from tokenizers import Tokenizer

    meta = json.loads((folder / "meta.json").read_text())
    tok = Tokenizer.from_file(str(folder / meta["tokenizer"]))
    streams = {s: TokenShards([folder / p for p in meta[f"{s}_shards"]], np.dtype(meta["dtype"]))
               for s in ("train", "val")}
    split = {s: iter(_split_documents(streams[s][0:streams[s].size], meta["eos_id"])) for s in streams}
    out = []
    for i in range(meta["documents"]):
        ids = next(split["val" if i % val_every == val_every - 1 else "train"])
        assert meta["eos_id"] not in ids
        out.append(tok.decode(ids, skip_special_tokens=False))
    assert all(next(it, None) is None for it in split.values()), "tokens left after the last document"
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _quiet(_line: str) -> None:
    pass


def test_prepare_decodes_back_exactly(corpus, tmp_path):
    out = tmp_path / "prep"
    meta = prepare(corpus["tok"], corpus["inputs"], out, val_every=10, shard_tokens=4000, workers=2, log=_quiet)
    assert _decoded(out, 10) == corpus["docs"]
    assert set(prepare_module._META_KEYS) <= set(meta) and json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["bos_id"] is None and meta["eos_id"] == 0
    assert meta["documents"] == 640 and meta["val_documents"] == 64 and meta["train_documents"] == 576
    assert meta["tokens"] == meta["train_tokens"] + meta["val_tokens"] == sum(s["tokens"] for s in meta["sources"])
    assert len(meta["train_shards"]) == -(-meta["train_tokens"] // 4000) > 3  # several shards, the last one short
    names = [Path(s["path"]).name for s in meta["sources"]]
    assert names == ["a.jsonl", "b.jsonl.gz", *[f"{i:03d}.txt" for i in range(100)], "zz.jsonl"]
    assert [s["documents"] for s in meta["sources"]][:3] == [300, 200, 1]
    assert meta["sources"][0]["bytes"] == os.path.getsize(corpus["inputs"][0])
    assert not (tmp_path / "prep.partial").exists()

    # Another core count, shard size aside: the same bytes.
    one = tmp_path / "one"
    prepare(corpus["tok"], corpus["inputs"], one, val_every=10, shard_tokens=4000, workers=1, log=_quiet)
    assert _files(one) == _files(out)

    c = load_corpus(out)
    full = np.concatenate([np.fromfile(out / p, np.uint16) for p in meta["train_shards"]])
    assert c.train.size == full.size == meta["train_tokens"] and c.vocab_size == meta["vocab_size"]
    assert np.array_equal(c.train[3990:4010], full[3990:4010])  # a window across a shard boundary
    assert c.eos_id == 0 and c.identity == {"tokenizer_sha256": meta["tokenizer_sha256"],
                                            "corpus_sha256": meta["corpus_sha256"]}
    with pytest.raises(ValueError, match="its tokenizer has .* tokens .* the model's vocab_size is 256"):
        c.check_vocab(256)
    with pytest.raises(ValueError, match="says the tokens are uint16"):
        load_corpus(out, "uint32")

    # A rerun finds the work done; a folder with other contents is not replaced without --overwrite.
    lines = []
    prepare(corpus["tok"], corpus["inputs"], out, val_every=10, shard_tokens=4000, workers=2, log=lines.append)
    assert lines == [f"[prepare] {out} already holds this preparation; nothing to do"]
    with pytest.raises(ValueError, match="exists and holds something else; pass --overwrite"):
        prepare(corpus["tok"], corpus["inputs"], out, val_every=5, workers=2, log=_quiet)


def test_prepare_bos_and_uint32(corpus, tmp_path):
    """add_bos_token puts BOS before every document; a vocabulary past 65,536 ids needs uint32 shards."""
    docs = corpus["docs"][:60]
    tok = _write_tokenizer(tmp_path / "tok", corpus["docs"], {"eos_token": EOS, "bos_token": BOS,
                                                              "add_bos_token": True}, extra_tokens=70_000)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in docs))
    meta = prepare(tok, [src], tmp_path / "prep", text_field="body", val_every=1000, workers=2, log=_quiet)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 1 << 16 and meta["val_tokens"] == 0
    tokens = np.fromfile(tmp_path / "prep" / meta["train_shards"][0], np.uint32)
    pieces = _split_documents(tokens, meta["eos_id"])
    assert all(p[0] == meta["bos_id"] for p in pieces) and len(pieces) == 60
    from tokenizers import Tokenizer
    decode = Tokenizer.from_file(str(tok / "tokenizer.json")).decode
    assert [decode(p[1:], skip_special_tokens=False) for p in pieces] == docs


def test_prepare_errors(corpus, tmp_path):
    no_config = _write_tokenizer(tmp_path / "bare", corpus["docs"][:50], None)
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n")
    with pytest.raises(ValueError, match="no eos_token .* pass --eos TOKEN"):
        prepare(no_config, [src], tmp_path / "o1", log=_quiet)
    meta = prepare(no_config, [src], tmp_path / "o2", eos=EOS, workers=1, log=_quiet)  # --eos instead
    assert meta["eos_id"] == 0 and meta["documents"] == 1
    with pytest.raises(ValueError, match="--eos '<s>' differs from eos_token"):
        prepare(corpus["tok"], [src], tmp_path / "o3", eos=BOS, log=_quiet)
    with pytest.raises(ValueError, match="'<nope>' is not a token"):
        prepare(no_config, [src], tmp_path / "o4", eos="<nope>", log=_quiet)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON line"):
        prepare(corpus["tok"], [bad], tmp_path / "o5", workers=1, log=_quiet)
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string field 'text' \(--text-field\)"):
        prepare(corpus["tok"], [bad], tmp_path / "o6", workers=1, log=_quiet)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv: not a \.txt, \.jsonl or \.jsonl\.gz file"):
        prepare(corpus["tok"], [tmp_path / "x.csv"], tmp_path / "o7", log=_quiet)
    with pytest.raises(ValueError, match="no tokenizer.json there"):
        prepare(tmp_path, [src], tmp_path / "o8", log=_quiet)
    # Before: a truncated .jsonl.gz ended in a bare EOFError traceback, an --output that is a file was found only
    # after the whole corpus was tokenized, and a broken tokenizer_config.json was a JSON error naming no file.
    import gzip

    whole = gzip.compress(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in corpus["docs"][:200]))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"--input .*cut\.jsonl\.gz: cannot be read past byte"):
        prepare(corpus["tok"], [cut], tmp_path / "o9", workers=1, log=_quiet)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="--output .*a_file is a file, not a folder"):
        prepare(corpus["tok"], [src], tmp_path / "a_file", overwrite=True, log=_quiet)
    broken = _write_tokenizer(tmp_path / "broken", corpus["docs"][:50], None)
    Path(broken, "tokenizer_config.json").write_text("{\n")
    with pytest.raises(ValueError, match=r"broken/tokenizer_config\.json is not a readable JSON file"):
        prepare(broken, [src], tmp_path / "o10", log=_quiet)


class _Stop(Exception):
    """Stands for the interruption (Ctrl-C, a killed job) after a commit."""


def _interrupted(corpus, out: Path, stop_at: int | None, **kw) -> list[str]:
    """prepare() with tiny jobs and commits, stopped after its `stop_at`-th commit; returns its log."""
    lines, commits = [], []

    def on_commit(record):
        commits.append(record)
        if len(commits) == stop_at:
            raise _Stop

    try:
        prepare(corpus["tok"], kw.pop("inputs", corpus["inputs"]), out, val_every=10, shard_tokens=4000,
                workers=2, block_bytes=16_000, commit_bytes=40_000, on_commit=on_commit, log=lines.append, **kw)
    except _Stop:
        assert stop_at is not None
        return [f"stopped at {commits[-1]['source']}:{commits[-1]['offset']}"]
    return lines


@pytest.mark.parametrize("stop_at", [
    2,   # inside a.jsonl (its committed prefix is re-read and checked)
    6,   # inside b.jsonl.gz (the prefix is decompressed again)
    10,  # among the .txt files, at a boundary between two inputs
])
def test_prepare_resumes_where_it_stopped(corpus, tmp_path, stop_at):
    ref = tmp_path / "ref"
    _interrupted(corpus, ref, None)
    out = tmp_path / "out"
    where = _interrupted(corpus, out, stop_at)[0]
    assert (tmp_path / "out.partial").is_dir() and not out.exists()
    log = _interrupted(corpus, out, None)
    source, offset = map(int, where.split()[-1].split(":"))
    assert any(f"resuming {out}.partial: {source} of 103 inputs done" in ln for ln in log), (where, log)
    assert (f"{offset:,} bytes into" in "\n".join(log)) == (offset > 0)
    assert _files(out) == _files(ref)


def test_prepare_redoes_what_changed(corpus, tmp_path, monkeypatch):
    """An input rewritten after the interruption with the same size and mtime is redone from it on: caught by
    the sampled fingerprint for finished inputs, and by the hash of the bytes read for the input being read
    (checked here with the fingerprint blinded)."""
    root = tmp_path / "inputs"
    root.mkdir()
    a = root / "a.jsonl"
    a.write_bytes(Path(corpus["inputs"][0]).read_bytes())
    inputs = [str(a), corpus["inputs"][1]]

    def rewrite_first_line() -> None:
        st = a.stat()
        body = a.read_bytes()
        a.write_bytes(body.replace(b'"text": " ', b'"text": "Q', 1))  # document 0, same length
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert a.stat().st_size == st.st_size

    out = tmp_path / "out"
    assert _interrupted(corpus, out, 6, inputs=inputs)[0].startswith("stopped at 1:")  # a.jsonl finished
    rewrite_first_line()
    log = _interrupted(corpus, out, None, inputs=inputs)
    assert any("a.jsonl changed since it was tokenized: redoing the inputs from it on" in ln for ln in log)
    fresh = tmp_path / "fresh"
    _interrupted(corpus, fresh, None, inputs=inputs)
    assert _files(out) == _files(fresh)
    assert _decoded(out, 10) == ["Q" + corpus["docs"][0][1:]] + corpus["docs"][1:]
    a.write_bytes(Path(corpus["inputs"][0]).read_bytes())

    monkeypatch.setattr(prepare_module, "fingerprint", lambda p: {"bytes": 0, "mtime_ns": 0, "sample_blake2b": ""})
    out2 = tmp_path / "out2"
    assert _interrupted(corpus, out2, 3, inputs=inputs)[0].startswith("stopped at 0:")  # inside a.jsonl
    rewrite_first_line()
    log = _interrupted(corpus, out2, None, inputs=inputs)
    assert any("bytes of" in ln and "a.jsonl changed: redoing it" in ln for ln in log), log
    blinded = {k: v for k, v in _files(out2).items() if k != "meta.json"}  # meta.json records the fingerprints
    assert blinded == {k: v for k, v in _files(fresh).items() if k != "meta.json"}
    assert data.read_meta(out2)["corpus_sha256"] == data.read_meta(fresh)["corpus_sha256"]


def test_prepare_cli(corpus, tmp_path, capsys):
    code = data.main(["prepare", "--tokenizer", str(corpus["tok"]), "--input", corpus["inputs"][0], "--input",
                      corpus["inputs"][1], "--output", str(tmp_path / "o"), "--val-every", "10", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 0 and "ETA" in err and "wrote" in err
    assert _decoded(tmp_path / "o", 10) == corpus["docs"]
    code = data.main(["prepare", "--tokenizer", str(corpus["tok"]), "--input", str(tmp_path / "absent.txt"),
                      "--output", str(tmp_path / "o2")])
    assert code == 2 and "error: --input" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
def _train_and_generate(prep: str, others: dict, root: str) -> dict:
    """Two steps from the prepared folder; the refusals (a vocabulary too large for the model, a --data-dtype
    that disagrees, a resume onto another tokenizer or corpus found at the same path); then generate from the
    checkpoint."""
    import contextlib
    import io

    from tritonmoe.dsv3 import DeepseekV3Config
    from tritonmoe.dsv3 import generate as gen
    from tritonmoe.dsv3.train import main

    root = Path(root)
    vocab = json.loads((Path(prep) / "meta.json").read_text())["vocab_size"]
    (root / "cfg.json").write_text(json.dumps(DeepseekV3Config.from_hf("tiny", vocab_size=vocab).to_hf()))
    common = ["--preset", str(root / "cfg.json"), "--batch-size", "4", "--seq-len", "32", "--val-every", "2",
              "--val-batches", "1", "--log-every", "100", "--data", prep]
    res = main(common + ["--steps", "2", "--out", str(root / "run")])
    errors = {}
    with pytest.raises(ValueError, match="its tokenizer has .* tokens .* vocab_size is 256") as e:
        main(common[2:] + ["--steps", "1", "--out", str(root / "never")])  # tiny's 256 embeddings
    errors["vocab"] = str(e.value)
    with pytest.raises(ValueError, match="--data-dtype uint32: .* says the tokens are uint16") as e:
        main(common + ["--steps", "1", "--data-dtype", "uint32", "--out", str(root / "never")])
    errors["dtype"] = str(e.value)
    for what, other in others.items():  # the same token counts, so only the identity can tell
        os.rename(prep, prep + ".first")
        os.rename(other, prep)
        try:
            with pytest.raises(ValueError, match=rf"--resume: .* trained with --data's {what} \(sha256\) .* the data "
                                                 "changed since the checkpoint") as e:
                main(common + ["--steps", "3", "--resume", "--out", str(root / "run")])
            errors[what] = str(e.value)
        finally:
            os.rename(prep, other)
            os.rename(prep + ".first", prep)
    assert not (root / "never").exists()

    outs = {}
    for how in ([], ["--tokenizer", prep]):  # found through the checkpoint's train state, or given
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = gen.main(["--checkpoint", str(root / "run"), "--prompt", "kalo mi", "--max-new-tokens", "12",
                             *how])
        outs[len(how)] = (code, stdout.getvalue(), stderr.getvalue())
    model, path, kind = gen.load_model(root / "run")
    codec = gen.resolve_codec(None, path, kind, model.config.vocab_size)
    ids = codec.encode("kalo mi")
    expected = codec.decode(ids + gen.generate(model, ids, 12, eos_id=codec.eos_id).new_ids) + "\n"
    return {"losses": res["losses"], "errors": errors, "outs": outs, "expected": expected}


def test_train_and_generate_from_prepared_folder(corpus, tmp_path):
    prep = tmp_path / "prep"
    prepare(corpus["tok"], corpus["inputs"], prep, val_every=10, workers=2, log=_quiet)
    # Another corpus of the same size: documents 0 and 1 (both training documents) swapped.
    swapped = tmp_path / "swapped.jsonl"
    lines = Path(corpus["inputs"][0]).read_text().splitlines(keepends=True)
    swapped.write_text("".join([lines[1], lines[0], *lines[2:]]))
    prepare(corpus["tok"], [swapped, corpus["inputs"][1]], tmp_path / "corpus", val_every=10, workers=2, log=_quiet)
    # Another tokenizer.json that tokenizes the same (written without indentation).
    from tokenizers import Tokenizer
    (tmp_path / "tok2").mkdir()
    Tokenizer.from_file(str(corpus["tok"] / "tokenizer.json")).save(str(tmp_path / "tok2" / "tokenizer.json"),
                                                                     pretty=False)
    (tmp_path / "tok2" / "tokenizer_config.json").write_bytes((corpus["tok"] / "tokenizer_config.json").read_bytes())
    prepare(tmp_path / "tok2", corpus["inputs"], tmp_path / "tokenizer", val_every=10, workers=2, log=_quiet)
    others = {what: str(tmp_path / what) for what in ("tokenizer", "corpus")}
    assert all(data.read_meta(o)["train_tokens"] == data.read_meta(prep)["train_tokens"] for o in others.values())

    (res,) = run_distributed(_train_and_generate, 1, str(prep), others, str(tmp_path))
    assert all(np.isfinite(v) for v in res["losses"].values()) and len(res["losses"]) == 2
    for code, stdout, stderr in res["outs"].values():
        assert code == 0 and stdout == res["expected"], stderr
        assert f"tokenizer {prep}" in stderr
    print("\n" + "\n".join(res["errors"].values()))
