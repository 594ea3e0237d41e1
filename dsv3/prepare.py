"""`prepare`: a text corpus tokenized into a folder the trainer reads (`train --data DIR`).

    python -m tritonmoe.dsv3.data prepare --tokenizer TOK --input PATH... --output DIR

prepare in:  TOK, a tokenizer.json or a folder holding one (read with the `tokenizers` library; EOS, and BOS
             when ``add_bos_token`` is set, from the tokenizer_config.json beside it, else ``--eos``); inputs
             in command-line order, each a .txt file (one document), a .jsonl / .jsonl.gz file (one document per
             line, its ``--text-field``), or a folder of those (sorted relative paths, hidden folders skipped).
prepare out: DIR/meta.json (dtype, vocab_size, eos_id, bos_id, tokenizer_sha256, train_shards, val_shards,
             documents, tokens, sources; plus the train/validation split, the shard size and
             ``corpus_sha256``, the identity a resumed training run is checked against), raw little-endian
             token shards train_NNNNN.bin / val_NNNNN.bin of at most ``--shard-tokens`` tokens each (uint16 when
             every id fits, else uint32), and DIR/tokenizer/ (a copy of the tokenizer files, so the folder alone
             is enough to decode samples). Each document becomes [BOS] tokens EOS and documents are packed back
             to back, without cross-document masking, as DeepSeek-V3's pretraining does (report sec. 4.2).
             Validation split: document i (0-based, counted over all inputs in order) is held out when
             ``i % val_every == val_every - 1`` (default every 100th document), so it never depends on the
             core count or on interruptions.

A pool of worker processes (one per CPU core by default) tokenizes batches of ~1 MiB of input; results are
written in input order, so the output is the same byte for byte whatever the core count. At most two batches
per worker are in flight: memory stays bounded by that plus the largest single document. Interruptions: the
work goes to DIR.partial; every ~64 MiB of input the shards are flushed to disk and a commit line is appended
to DIR.partial/progress.jsonl. A rerun with the same tokenizer and options keeps every committed source whose
fingerprint still matches (size, mtime and a hash of 16 blocks sampled through the file: a rewrite with the same
size and mtime shows too) and, inside the source that was being read, the committed prefix after re-reading it
against the hash of what was read then. The folder is renamed to DIR when complete.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

META_FILE = "meta.json"
PROGRESS_FILE = "progress.jsonl"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
VAL_EVERY_DOCUMENT = 100     # prepare: document i is held out when i % 100 == 99
SHARD_TOKENS = 1 << 28       # prepare: tokens per shard file (512 MiB of uint16)
BLOCK_BYTES = 1 << 20        # prepare: input bytes per tokenization job
COMMIT_BYTES = 64 << 20      # prepare: input bytes between two commits (flush + progress line)
COMMIT_SECONDS = 60.0        # prepare: ... or seconds, whichever comes first
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # never listed in a folder
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 16, 1 << 16  # fingerprint: 16 blocks of 64 KiB (the whole file when small)


# ------------------------------------------------------------------------------------------------------------
# The folder format (written here, read by data.py)
_META_KEYS = ("dtype", "vocab_size", "eos_id", "bos_id", "tokenizer_sha256", "train_shards", "val_shards",
              "documents", "tokens", "sources", "train_tokens", "val_tokens", "corpus_sha256")


def read_meta(folder: str | os.PathLike) -> dict:
    """A prepared folder's meta.json, checked for the keys the readers use (ValueError naming the file)."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable meta.json ({e})") from e
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (not written by `tritonmoe.dsv3.data prepare`?)")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{path}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
    return meta


def sorted_files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files under root in sorted relative-path order (os.walk order differs between machines)."""
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS and not x.startswith(".")]
        files += [Path(d) / n for n in names if suffixes is None or n.endswith(suffixes)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# ------------------------------------------------------------------------------------------------------------
# Tokenizers
@dataclass(frozen=True)
class TokenizerInfo:
    path: Path              # the tokenizer.json
    sha256: str             # of tokenizer.json's bytes: the tokenizer's identity
    vocab_size: int         # 1 + the largest id, added tokens included
    eos_id: int | None      # document separator / end of generation
    bos_id: int | None      # set only when tokenizer_config.json has add_bos_token: prepended to each document
    config: Path | None     # tokenizer_config.json beside tokenizer.json, if any


def _special_token(config: dict, key: str) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as a dict with "content"."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str | os.PathLike, eos: str | None = None):
    """(tokenizers.Tokenizer, TokenizerInfo) for a tokenizer.json or a folder holding one. EOS: the
    ``eos_token`` of tokenizer_config.json beside it, else `eos` (a token string); both given must agree."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ValueError("the `tokenizers` package is needed for a tokenizer: pip install 'tritonmoe[data]'") from e
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"--tokenizer {path}: no {TOKENIZER_FILE} there")
    text = file.read_bytes()
    try:
        tok = Tokenizer.from_str(text.decode("utf-8"))
    except Exception as e:  # the Rust side raises a bare Exception for any malformed file
        raise ValueError(f"--tokenizer {file}: not a `tokenizers` tokenizer.json ({e})") from e
    config_path = file.with_name(TOKENIZER_CONFIG)
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--tokenizer: {config_path} is not a readable JSON file ({e})") from None

    def token_id(token: str, what: str) -> int:
        i = tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{what} {token!r} is not a token of {file}")
        return i

    eos_token = _special_token(config, "eos_token")
    if eos is not None and eos_token is not None and eos != eos_token:
        raise ValueError(f"--eos {eos!r} differs from eos_token {eos_token!r} in {config_path}")
    eos_token = eos_token if eos_token is not None else eos
    eos_id = token_id(eos_token, f"EOS ({config_path if eos is None else '--eos'})") if eos_token else None
    bos_id = None
    if config.get("add_bos_token"):
        bos_token = _special_token(config, "bos_token")
        if bos_token is None:
            raise ValueError(f"{config_path} sets add_bos_token but names no bos_token")
        bos_id = token_id(bos_token, f"bos_token of {config_path}")
    vocab = tok.get_vocab(with_added_tokens=True)
    info = TokenizerInfo(file.resolve(), hashlib.sha256(text).hexdigest(), max(vocab.values()) + 1, eos_id, bos_id,
                         config_path.resolve() if config_path.is_file() else None)
    return tok, info


# ------------------------------------------------------------------------------------------------------------
# prepare: sources
def _source_kind(path: Path) -> str | None:
    name = path.name
    return "txt" if name.endswith(TEXT_SUFFIXES) else "jsonl" if name.endswith(JSONL_SUFFIXES) else None


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Every input file in order: files as given, folders as their .txt/.jsonl/.jsonl.gz files (sorted)."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted_files(p, TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise ValueError(f"--input {p}: no .txt, .jsonl or .jsonl.gz file in this folder")
            files += found
        elif p.is_file():
            if _source_kind(p) is None:
                raise ValueError(f"--input {p}: not a .txt, .jsonl or .jsonl.gz file")
            files.append(p)
        else:
            raise ValueError(f"--input {p}: no such file or folder")
    return [f.resolve() for f in files]


def fingerprint(path: Path) -> dict:
    """A cheap content fingerprint: size, mtime and a blake2b of 16 blocks of 64 KiB spread evenly over the
    file, the first and the last included (the whole file below 1 MiB)."""
    st = path.stat()
    h = hashlib.blake2b(st.st_size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as f:
        if st.st_size <= _SAMPLE_BLOCKS * _SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (st.st_size - _SAMPLE_BYTES) / (_SAMPLE_BLOCKS - 1)
            for i in range(_SAMPLE_BLOCKS):
                f.seek(int(i * step))
                h.update(f.read(_SAMPLE_BYTES))
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_blake2b": h.hexdigest()}


@dataclass(frozen=True)
class _Job:
    """One tokenization job and where the source stands once it is written."""
    kind: str            # "txt" or "jsonl"
    path: str            # for error messages
    first_line: int      # jsonl: 1-based number of the block's first line
    payload: bytes       # the whole .txt, or whole jsonl lines
    source: int          # index of the source in the input list
    offset: int          # bytes of the (decompressed) source consumed after this block
    lines: int           # lines consumed after this block
    prefix_blake2b: str  # blake2b of those bytes
    raw_pos: int         # position in the file as stored (compressed for .gz), for the progress display
    last: bool           # the source's final block


class _SourceReader:
    """Reads source `index` in blocks of whole lines from `offset` on, hashing every byte it hands out from the
    first one: resuming inside a source re-reads its prefix, and `prefix_blake2b()` then says whether it is what
    was read before."""

    def __init__(self, path: Path, index: int, offset: int = 0, lines: int = 0, block_bytes: int = BLOCK_BYTES):
        self.path, self.index, self.kind, self.block = path, index, _source_kind(path), block_bytes
        self.raw = open(path, "rb")
        self.f = gzip.GzipFile(fileobj=self.raw) if path.name.endswith(".gz") else self.raw
        self.hash = hashlib.blake2b(digest_size=16)
        self.offset, self.lines = 0, lines
        while self.offset < offset:
            chunk = self._read(min(offset - self.offset, self.block))
            if not chunk:
                break
            self.hash.update(chunk)
            self.offset += len(chunk)

    def prefix_blake2b(self) -> str:
        return self.hash.hexdigest()

    def _read(self, n: int) -> bytes:
        """Up to n bytes (all with -1); a damaged or truncated file is a ValueError naming it."""
        try:
            return self.f.read(n)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"--input {self.path}: cannot be read past byte {self.offset} of its content "
                             f"({type(e).__name__}: {e}); is it truncated or damaged?") from None

    def close(self) -> None:
        self.raw.close()

    def jobs(self) -> Iterator[_Job]:
        """The remaining blocks; the last one is flagged (an empty file still yields one)."""
        try:
            if self.kind == "txt":
                yield self._job(self._read(-1), True)
                return
            tail = b""
            while True:
                chunk = self._read(self.block)
                if not chunk:
                    yield self._job(tail, True)  # a last line without its newline (often b"")
                    return
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:  # no line ends in this chunk: a line longer than a block
                    tail += chunk
                    continue
                block, tail = tail + chunk[:cut], chunk[cut:]
                yield self._job(block, False)
        finally:
            self.close()

    def _job(self, payload: bytes, last: bool) -> _Job:
        first_line = self.lines + 1
        self.lines += payload.count(b"\n") + (1 if last and payload and not payload.endswith(b"\n") else 0)
        self.hash.update(payload)
        self.offset += len(payload)
        return _Job(self.kind, str(self.path), first_line, payload, self.index, self.offset, self.lines,
                    self.hash.hexdigest(), self.raw.tell(), last)


# ------------------------------------------------------------------------------------------------------------
# prepare: tokenization (worker processes)
_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    # The pool is the parallelism: the library's own thread pool in every worker would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _documents(job: _Job, text_field: str) -> list[str]:
    if job.kind == "txt":
        try:
            return [job.payload.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"{job.path}: not UTF-8 text (byte {e.start})") from None
    texts = []
    for n, line in enumerate(job.payload.split(b"\n"), job.first_line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
            raise ValueError(f"{job.path}:{n}: not a JSON line ({e})") from None
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{job.path}:{n}: no string field {text_field!r} (--text-field)")
        texts.append(text)
    return texts


def _tokenize(job: _Job, text_field: str, bos_id: int | None, eos_id: int, dtype: str):
    """(tokens of every document of the job, each [BOS] ids EOS, concatenated; the documents' lengths)."""
    texts = _documents(job, text_field)
    encode = getattr(_worker_tokenizer, "encode_batch_fast", _worker_tokenizer.encode_batch)  # fast: no offsets
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    head, tail = ([] if bos_id is None else [bos_id]), [eos_id]
    lengths = np.array([len(head) + len(x) + 1 for x in ids], dtype=np.int64)
    flat = np.fromiter((t for x in ids for part in (head, x, tail) for t in part), dtype=np.dtype(dtype),
                       count=int(lengths.sum()))
    return flat, lengths


# ------------------------------------------------------------------------------------------------------------
# prepare: output shards and the progress log
class _CannotResume(Exception):
    """The partial output does not hold what its progress log says (a shard shorter than committed)."""


class _ShardWriter:
    """Appends tokens to NAME_00000.bin, NAME_00001.bin, ... of `shard_tokens` tokens each (the last one
    shorter), continuing after the first `tokens` tokens: anything written after them is cut off."""

    def __init__(self, folder: Path, name: str, dtype: str, shard_tokens: int, tokens: int):
        self.folder, self.name, self.dtype, self.per_shard = folder, name, np.dtype(dtype), shard_tokens
        self.tokens, self.f, self.f_index = tokens, None, -1
        full, rest = divmod(tokens, shard_tokens)
        keep = full + (1 if rest else 0)
        for p in folder.glob(f"{name}_*.bin"):
            if int(p.stem.rsplit("_", 1)[1]) >= keep:
                p.unlink()
        for i in range(keep):
            want = (shard_tokens if i < full else rest) * self.dtype.itemsize
            p = self._path(i)
            have = p.stat().st_size if p.is_file() else -1
            if have < want:
                raise _CannotResume(f"{p} holds {max(have, 0)} bytes, {want} were committed")
            if have > want:
                os.truncate(p, want)

    def _path(self, i: int) -> Path:
        return self.folder / f"{self.name}_{i:05d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            i, used = divmod(self.tokens, self.per_shard)
            if self.f_index != i:
                self.close()
                self.f, self.f_index = open(self._path(i), "ab"), i
            n = min(self.per_shard - used, tokens.size)
            self.f.write(tokens[:n].tobytes())
            tokens, self.tokens = tokens[n:], self.tokens + n

    def commit(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.commit()
            self.f.close()
            self.f, self.f_index = None, -1

    def shards(self) -> list[str]:
        return [self._path(i).name for i in range(-(-self.tokens // self.per_shard))]


@dataclass
class _Position:
    """Where a preparation stands: the stream totals and the source being read."""
    documents: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    source: int = 0               # index of the source being read (== number of finished sources)
    offset: int = 0               # bytes of it consumed (decompressed), lines consumed, their blake2b
    lines: int = 0
    prefix_blake2b: str | None = None
    fingerprint: dict | None = None   # of the source being read, taken when it was opened
    source_documents: int = 0
    source_tokens: int = 0
    source_start: tuple = (0, 0, 0)   # (documents, train_tokens, val_tokens) when the source began

    def totals(self) -> tuple:
        return self.documents, self.train_tokens, self.val_tokens

    def restart_source(self) -> None:
        """Back to the beginning of the current source."""
        self.documents, self.train_tokens, self.val_tokens = self.source_start
        self.offset, self.lines, self.prefix_blake2b, self.fingerprint = 0, 0, None, None
        self.source_documents = self.source_tokens = 0


def _same_file(fp: dict, record: dict) -> bool:
    return all(fp[k] == record.get(k) for k in ("bytes", "mtime_ns", "sample_blake2b"))


def _fresh(tmp: Path, settings: dict) -> tuple[list[dict], _Position]:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / PROGRESS_FILE).write_text(json.dumps({"settings": settings}) + "\n")
    return [], _Position()


def _resume_point(tmp: Path, settings: dict, sources: list[Path], log) -> tuple[list[dict], _Position]:
    """(finished sources kept, position to continue from) of a partial output; rewrites its progress log to
    that point. Anything not covered by a commit, or left with other settings, is dropped."""
    path = tmp / PROGRESS_FILE
    if not path.is_file():
        return _fresh(tmp, settings)
    records, done, pending, commit = [], [], [], None
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by the interruption
            break
    if not records or records[0].get("settings") != settings:
        log(f"[prepare] removing {tmp}: left by a preparation with another tokenizer or other options")
        return _fresh(tmp, settings)
    for r in records[1:]:
        if "done" in r:
            pending.append(r)
        elif "commit" in r:
            done, pending, commit = done + pending, [], r
    if commit is None:
        return _fresh(tmp, settings)
    kept = 0
    while (kept < len(done) and kept < len(sources) and done[kept]["path"] == str(sources[kept])
           and _same_file(fingerprint(sources[kept]), done[kept])):
        kept += 1
    pos = _Position(**{k: commit[k] for k in _Position.__dataclass_fields__})
    pos.source_start = tuple(pos.source_start)
    assert pos.source == len(done), (pos.source, len(done))
    if kept < len(done):
        log(f"[prepare] {done[kept]['path']} changed since it was tokenized: redoing the inputs from it on")
        pos = _Position(*done[kept]["start"], source=kept)
        pos.source_start = tuple(done[kept]["start"])
    elif pos.offset and not (kept < len(sources) and commit.get("path") == str(sources[kept])
                             and _same_file(fingerprint(sources[kept]), pos.fingerprint)):
        pos.restart_source()
    log(f"[prepare] resuming {tmp}: {kept} of {len(sources)} inputs done"
        + (f", {pos.offset:,} bytes into {sources[kept]}" if pos.offset else ""))
    done = done[:kept]
    _rewrite_log(path, settings, done, pos, sources)
    return done, pos


def _commit_record(pos: _Position, sources: list[Path]) -> dict:
    return {"commit": True, **{k: getattr(pos, k) for k in _Position.__dataclass_fields__},
            "path": str(sources[pos.source]) if pos.source < len(sources) else None}


def _rewrite_log(path: Path, settings: dict, done: list[dict], pos: _Position, sources: list[Path]) -> None:
    lines = [{"settings": settings}, *done, _commit_record(pos, sources)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------
# prepare: the driver
class _Progress:
    """At most one line every `every` seconds: input bytes done, documents, tokens, rate and ETA."""

    def __init__(self, total_bytes: int, start_bytes: int, log, every: float = 2.0):
        self.total, self.start, self.log, self.every = total_bytes, start_bytes, log, every
        self.t0 = self.last = time.monotonic()

    def update(self, done_bytes: int, pos: _Position, n_sources: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = (done_bytes - self.start) / max(now - self.t0, 1e-9)
        eta = f"{(self.total - done_bytes) / rate:.0f}s" if rate > 0 else "?"
        self.log(f"[prepare] {done_bytes / 2**20:,.1f}/{self.total / 2**20:,.1f} MiB "
                 f"({100 * done_bytes / max(self.total, 1):.1f}%), inputs {pos.source}/{n_sources}, "
                 f"{pos.documents:,} documents, {pos.train_tokens + pos.val_tokens:,} tokens, "
                 f"{rate / 2**20:.1f} MiB/s, ETA {eta}")


def _settings(info: TokenizerInfo, dtype: str, text_field: str, val_every: int, shard_tokens: int) -> dict:
    """What the output depends on (the core count is not): a partial output made with other settings is
    redone, and a complete one is not reused."""
    return {"format_version": FORMAT_VERSION, "tokenizer_sha256": info.sha256, "vocab_size": info.vocab_size,
            "eos_id": info.eos_id, "bos_id": info.bos_id, "dtype": dtype, "text_field": text_field,
            "val_every": val_every, "shard_tokens": shard_tokens}


def _corpus_sha256(settings: dict, sources: list[dict]) -> str:
    """The stream's identity: tokenizer, join and split rules, and the content hash of every input in order
    (the shard size and the inputs' paths do not change the stream)."""
    keys = ("tokenizer_sha256", "eos_id", "bos_id", "text_field", "val_every")
    ident = {**{k: settings[k] for k in keys}, "inputs": [s["blake2b"] for s in sources]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _up_to_date(meta: dict, settings: dict, sources: list[Path]) -> bool:
    return (all(meta.get(k) == v for k, v in settings.items()) and len(meta["sources"]) == len(sources)
            and all(r["path"] == str(p) and _same_file(fingerprint(p), r) for r, p in zip(meta["sources"], sources)))


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(tokenizer: str | os.PathLike, inputs: list[str | os.PathLike], output: str | os.PathLike, *,
            text_field: str = "text", eos: str | None = None, val_every: int = VAL_EVERY_DOCUMENT,
            workers: int | None = None, shard_tokens: int = SHARD_TOKENS, overwrite: bool = False,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
            block_bytes: int = BLOCK_BYTES, commit_bytes: int = COMMIT_BYTES,
            on_commit: Callable[[dict], None] | None = None) -> dict:
    """Tokenize `inputs` into the folder `output` (see the module docstring); returns its meta.json dict.
    `block_bytes` is the input of one tokenization job, `commit_bytes` the input between commits, and
    `on_commit(record)` is called after each commit (tests shrink the first two and interrupt the run there)."""
    tok, info = load_tokenizer(tokenizer, eos)
    if info.eos_id is None:
        raise ValueError(f"--tokenizer {tokenizer}: no eos_token in a {TOKENIZER_CONFIG} beside {info.path}; "
                         "pass --eos TOKEN (the token that ends each document)")
    for name, value in (("val-every", val_every), ("shard-tokens", shard_tokens), ("workers", workers or 1)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    workers = workers or _default_workers()
    sources = expand_inputs(inputs)
    if not sources:
        raise ValueError("no --input given")
    dtype = "uint16" if info.vocab_size <= 1 << 16 else "uint32"
    settings = _settings(info, dtype, text_field, val_every, shard_tokens)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a folder")
    if out.exists():
        if (out / META_FILE).is_file():
            meta = read_meta(out)
            if _up_to_date(meta, settings, sources):
                log(f"[prepare] {out} already holds this preparation; nothing to do")
                return meta
        if not overwrite:
            raise ValueError(f"--output {out} exists and holds something else; pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".partial")
    done, pos = _resume_point(tmp, settings, sources, log)
    try:
        writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens, getattr(pos, f"{split}_tokens"))
                   for split in ("train", "val")}
    except _CannotResume as e:
        log(f"[prepare] cannot resume {tmp} ({e}): starting over")
        done, pos = _fresh(tmp, settings)
        writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens, 0) for split in ("train", "val")}

    sizes = [p.stat().st_size for p in sources]
    before = np.cumsum([0] + sizes)
    progress = _Progress(int(before[-1]), int(before[pos.source]), log)
    progress_log = open(tmp / PROGRESS_FILE, "a")
    t0, since_commit, last_commit = time.monotonic(), 0, time.monotonic()
    new_done: list[dict] = []
    fingerprints: dict[int, dict] = {}

    first, first_offset = pos.source, pos.offset

    def jobs() -> Iterator[_Job]:
        for k in range(first, len(sources)):
            fingerprints[k] = fingerprint(sources[k])
            if k == first and first_offset:
                reader = _SourceReader(sources[k], k, pos.offset, pos.lines, block_bytes)
                if reader.offset == pos.offset and reader.prefix_blake2b() == pos.prefix_blake2b:
                    yield from reader.jobs()
                    continue
                reader.close()
                log(f"[prepare] the first {pos.offset:,} bytes of {sources[k]} changed: redoing it")
                pos.restart_source()
                for split, w in writers.items():
                    w.close()
                    writers[split] = _ShardWriter(tmp, split, dtype, shard_tokens, getattr(pos, f"{split}_tokens"))
            yield from _SourceReader(sources[k], k, block_bytes=block_bytes).jobs()

    def commit() -> None:
        for w in writers.values():
            w.commit()
        record = _commit_record(pos, sources)
        progress_log.write("".join(json.dumps(r) + "\n" for r in (*new_done, record)))
        progress_log.flush()
        os.fsync(progress_log.fileno())
        done.extend(new_done)
        new_done.clear()
        if on_commit is not None:
            on_commit(record)

    def write(job: _Job, tokens: np.ndarray, lengths: np.ndarray) -> None:
        nonlocal since_commit, last_commit
        assert job.source == pos.source, (job.source, pos.source)
        is_val = (pos.documents + np.arange(lengths.size)) % val_every == val_every - 1
        mask = np.repeat(is_val, lengths)
        writers["train"].write(tokens[~mask])
        writers["val"].write(tokens[mask])
        pos.documents += lengths.size
        pos.train_tokens, pos.val_tokens = writers["train"].tokens, writers["val"].tokens
        pos.source_documents += lengths.size
        pos.source_tokens += tokens.size
        pos.offset, pos.lines, pos.prefix_blake2b = job.offset, job.lines, job.prefix_blake2b
        pos.fingerprint = fingerprints[job.source]
        if job.last:
            new_done.append({"done": job.source, "path": job.path, **pos.fingerprint, "blake2b": job.prefix_blake2b,
                             "documents": pos.source_documents, "tokens": pos.source_tokens,
                             "start": list(pos.source_start)})
            pos.source += 1
            pos.source_start = pos.totals()
            pos.offset, pos.lines, pos.prefix_blake2b, pos.fingerprint = 0, 0, None, None
            pos.source_documents = pos.source_tokens = 0
        since_commit += len(job.payload)
        if since_commit >= commit_bytes or time.monotonic() - last_commit >= COMMIT_SECONDS:
            commit()
            since_commit, last_commit = 0, time.monotonic()
        progress.update(int(before[job.source]) + (sizes[job.source] if job.last else job.raw_pos), pos,
                        len(sources))

    encode = functools.partial(_tokenize, text_field=text_field, bos_id=info.bos_id, eos_id=info.eos_id,
                               dtype=dtype)
    # fork where there is one: workers start in milliseconds instead of re-importing torch (spawn)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(info.path.read_text(),)) as pool:
            pending: deque = deque()
            for job in jobs():
                pending.append((job, pool.apply_async(encode, (job,))))
                while len(pending) >= 2 * workers:  # bounded: input is read at most this far ahead
                    job_, result = pending.popleft()
                    write(job_, *result.get())
            while pending:
                job_, result = pending.popleft()
                write(job_, *result.get())
        commit()
    finally:
        progress_log.close()
        for w in writers.values():
            w.close()
    progress.update(int(before[-1]), pos, len(sources), force=True)
    meta = _write_meta(tmp, info, settings, done, writers)
    if out.exists():
        shutil.rmtree(out)
    (tmp / PROGRESS_FILE).unlink()
    tmp.rename(out)
    seconds = time.monotonic() - t0
    log(f"[prepare] wrote {out}: {meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta['train_tokens']:,} "
        f"train, {meta['val_tokens']:,} validation) in {seconds:.1f}s with {workers} worker(s)")
    return meta


def _write_meta(tmp: Path, info: TokenizerInfo, settings: dict, done: list[dict], writers: dict) -> dict:
    """Copy the tokenizer files into the folder and write meta.json (atomically, last)."""
    (tmp / TOKENIZER_DIR).mkdir(exist_ok=True)
    shutil.copyfile(info.path, tmp / TOKENIZER_DIR / TOKENIZER_FILE)
    if info.config is not None:
        shutil.copyfile(info.config, tmp / TOKENIZER_DIR / TOKENIZER_CONFIG)
    sources = [{k: d[k] for k in ("path", "bytes", "mtime_ns", "sample_blake2b", "blake2b", "documents", "tokens")}
               for d in done]
    documents = sum(s["documents"] for s in sources)
    val_documents = documents // settings["val_every"]
    meta = {**settings, "tokenizer": f"{TOKENIZER_DIR}/{TOKENIZER_FILE}", "tokenizer_source": str(info.path),
            "train_shards": writers["train"].shards(), "val_shards": writers["val"].shards(),
            "documents": documents, "train_documents": documents - val_documents, "val_documents": val_documents,
            "tokens": writers["train"].tokens + writers["val"].tokens, "train_tokens": writers["train"].tokens,
            "val_tokens": writers["val"].tokens, "corpus_sha256": _corpus_sha256(settings, sources),
            "sources": sources}
    part = tmp / (META_FILE + ".tmp")
    part.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(part, tmp / META_FILE)
    return meta


def tokenizer_of(folder: str | os.PathLike) -> Path:
    """The tokenizer.json a prepared folder was made with (its own copy), checked against meta.json's hash."""
    folder = Path(folder)
    meta = read_meta(folder)
    path = folder / meta.get("tokenizer", f"{TOKENIZER_DIR}/{TOKENIZER_FILE}")
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != meta["tokenizer_sha256"]:
        raise ValueError(f"{folder}: its tokenizer copy {path} is missing or is not the one meta.json names")
    return path


