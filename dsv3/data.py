"""Training data for the example trainer: token streams and deterministic batches.

In: nothing (the default corpus: the Python standard library's own .py sources, present on every machine
with Python, read byte-level so vocab = 256), a user text file or folder (byte-level too), a pre-tokenized file
of uint16/uint32 token ids (read through np.memmap, never loaded whole), or a folder written by `prepare`
(its meta.json says the dtype, vocabulary and EOS; its shards are memory-mapped).
Out: a `Corpus` with a train and a held-out validation token stream, and `batch(...)`, which returns the
sequences of one rank's share of step s's global batch.

Determinism: the global batch of step s is B windows of seq_len tokens at offsets drawn from a generator
seeded with (seed, s) only. Data-parallel rank r of W takes sequences [r*B/W, (r+1)*B/W). So the same
sequences are trained on at step s whatever the world size or EP degree, and resuming at step s needs no
data-loader state beyond s itself.

`prepare` (tokenizing a text corpus into such a folder) lives in prepare.py; its command line is this module's:

    python -m tritonmoe.dsv3.data prepare --tokenizer TOK --input PATH... --output DIR
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .prepare import META_FILE, SHARD_TOKENS, VAL_EVERY_DOCUMENT, prepare, read_meta, sorted_files

VAL_EVERY = 20  # folders: every 20th file (sorted order) is held out for validation
VAL_FRACTION = 0.05  # single files: the last 5% of the tokens are held out



@dataclass(frozen=True)
class Corpus:
    train: np.ndarray | TokenShards  # 1-D token ids (uint8 bytes, a uint16/uint32 memmap, or prepared shards)
    val: np.ndarray | TokenShards    # held-out 1-D token ids, same dtype
    vocab_size: int  # ids are < vocab_size (256 for bytes; the tokenizer's for a prepared folder)
    description: str  # one line for the log
    # What a resumed run must find again, flat and JSON-able: "tokenizer_sha256" ("byte-level" for bytes, None
    # for a bare token file) and "corpus_sha256" (None for a bare token file, which is not hashed whole).
    identity: dict = field(default_factory=dict)
    eos_id: int | None = None  # the document separator of a prepared folder

    def check_vocab(self, model_vocab_size: int) -> None:
        """ValueError when the data's ids do not all fit a model with `model_vocab_size` embeddings."""
        if self.vocab_size <= model_vocab_size:
            return
        if self.eos_id is not None:  # a prepared folder: the tokenizer sets the vocabulary
            raise ValueError(f"{self.description.split(':')[0]}: its tokenizer has {self.vocab_size} tokens (meta.json "
                             f"vocab_size) but the model's vocab_size is {model_vocab_size}: use a model config "
                             f"(--preset CONFIG.json) with vocab_size >= {self.vocab_size}")
        raise ValueError(f"data has token ids up to {self.vocab_size - 1} but the model's vocab_size is "
                         f"{model_vocab_size}")


class TokenShards:
    """The concatenation of raw token files as one read-only 1-D stream: ``.size``, ``.dtype``, ``len()`` and
    ``[a:b]`` slices (a copy when the slice crosses a shard boundary; windows may, since documents are packed
    with no regard to shards). Shards are memory-mapped on first use, at most 64 at a time."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.paths = [p for p in paths if p.stat().st_size > 0]  # np.memmap refuses empty files
        sizes = [p.stat().st_size // self.dtype.itemsize for p in self.paths]
        self.starts = np.cumsum([0] + sizes)
        self.size = int(self.starts[-1])
        self._open: dict[int, np.memmap] = {}  # a bounded number of maps: each holds a file descriptor

    def __len__(self) -> int:
        return self.size

    def _shard(self, i: int) -> np.memmap:
        if i not in self._open:
            if len(self._open) >= 64:
                del self._open[next(iter(self._open))]
            self._open[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
        return self._open[i]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"TokenShards supports contiguous slices only, got {key!r}")
        a, b, _ = key.indices(self.size)
        if a >= b:
            return np.empty(0, self.dtype)
        parts, i = [], int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            parts.append(self._shard(i)[a - lo:min(b, hi) - lo])
            a, i = min(b, hi), i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _bytes_corpus(files: list[Path], description: str) -> Corpus:
    if not files:
        raise ValueError(f"no input files for {description}")
    if len(files) >= VAL_EVERY:
        val_files = files[VAL_EVERY - 1::VAL_EVERY]
        train_files = [f for i, f in enumerate(files) if i % VAL_EVERY != VAL_EVERY - 1]
        train = np.frombuffer(b"\n".join(f.read_bytes() for f in train_files), dtype=np.uint8)
        val = np.frombuffer(b"\n".join(f.read_bytes() for f in val_files), dtype=np.uint8)
        return Corpus(train, val, 256, f"{description}: {len(train_files)} files / {train.size:,} bytes train, "
                                       f"{len(val_files)} files / {val.size:,} bytes validation",
                      _bytes_identity(train, val))
    data = np.frombuffer(b"\n".join(f.read_bytes() for f in files), dtype=np.uint8)
    return _split_tail(data, 256, description, _bytes_identity(data))


def _bytes_identity(*parts: np.ndarray) -> dict:
    """Byte-level data is in memory already: hashing it costs ~0.1 s for the stdlib corpus."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes())
    return {"tokenizer_sha256": "byte-level", "corpus_sha256": h.hexdigest()}


def _split_tail(data: np.ndarray, vocab_size: int, description: str, identity: dict) -> Corpus:
    n_val = max(1, int(data.size * VAL_FRACTION))
    train, val = data[:-n_val], data[-n_val:]
    return Corpus(train, val, vocab_size,
                  f"{description}: {train.size:,} tokens train, {val.size:,} tokens validation", identity)


def stdlib_corpus() -> Corpus:
    """The Python standard library's .py files (third-party site-packages excluded), byte-level."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _bytes_corpus(sorted_files(root, (".py",)), f"Python stdlib sources in {root}")


def load_corpus(data: str | os.PathLike | None = None, token_dtype: str | None = None) -> Corpus:
    """data=None: the stdlib corpus. A folder with a meta.json: the `prepare` output it describes. Another
    folder: every file in it, byte-level. A file: its bytes, or, with token_dtype 'uint16' / 'uint32', a flat
    array of token ids of that type (memory-mapped)."""
    if data is None:
        if token_dtype is not None:
            raise ValueError(f"--data-dtype {token_dtype} needs --data (a token file)")
        return stdlib_corpus()
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or folder")
    if path.is_dir() and (path / META_FILE).is_file():
        return prepared_corpus(path, token_dtype)
    if token_dtype is not None:
        if token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"token dtype must be uint16 or uint32, got {token_dtype!r}")
        if not path.is_file():
            raise ValueError(f"--data {path}: a token file must be a file, not a folder")
        tokens = np.memmap(path, dtype=np.dtype(token_dtype), mode="r")
        if tokens.size < 2:
            raise ValueError(f"--data {path}: holds {tokens.size} tokens")
        # The max over a memmap reads the file once; it sets the vocabulary a model must at least cover.
        return _split_tail(tokens, int(tokens.max()) + 1, f"{token_dtype} tokens in {path}",
                           {"tokenizer_sha256": None, "corpus_sha256": None})
    if path.is_dir():
        return _bytes_corpus(sorted_files(path, None), f"text files in {path}")
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    return _split_tail(data, 256, f"text file {path}", _bytes_identity(data))


def prepared_corpus(folder: str | os.PathLike, token_dtype: str | None = None) -> Corpus:
    """The train and validation streams of a `prepare` output folder, memory-mapped; dtype, vocabulary and EOS
    from its meta.json. `token_dtype` (--data-dtype) is not needed; given, it must agree."""
    folder = Path(folder)
    meta = read_meta(folder)
    if token_dtype is not None and token_dtype != meta["dtype"]:
        raise ValueError(f"--data-dtype {token_dtype}: {folder / META_FILE} says the tokens are {meta['dtype']} "
                         "(leave --data-dtype out for a prepared folder)")
    streams = {}
    for split in ("train", "val"):
        paths = [folder / p for p in meta[f"{split}_shards"]]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise ValueError(f"--data {folder}: shard {absent[0]} listed in meta.json is missing")
        streams[split] = TokenShards(paths, np.dtype(meta["dtype"]))
        if streams[split].size != meta[f"{split}_tokens"]:
            raise ValueError(f"--data {folder}: the {split} shards hold {streams[split].size} tokens, meta.json says "
                             f"{meta[f'{split}_tokens']} (a damaged or partial copy?)")
    description = (f"prepared data {folder}: {meta['documents']:,} documents, {streams['train'].size:,} tokens "
                   f"train, {streams['val'].size:,} tokens validation ({meta['dtype']}, vocab {meta['vocab_size']})")
    return Corpus(streams["train"], streams["val"], int(meta["vocab_size"]), description,
                  {"tokenizer_sha256": meta["tokenizer_sha256"], "corpus_sha256": meta["corpus_sha256"]},
                  int(meta["eos_id"]))


def step_offsets(seed: int, step: int, global_batch: int, n_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets [global_batch] of step `step`'s windows (seq_len tokens each); a function of
    (seed, step) only."""
    if n_tokens < seq_len:
        raise ValueError(f"corpus of {n_tokens} tokens is shorter than one sequence of {seq_len}")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len + 1, size=global_batch, dtype=np.int64)


def batch(tokens: np.ndarray | TokenShards, seed: int, step: int, global_batch: int, seq_len: int,
          dp_rank: int = 0, dp_size: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """This rank's share of step `step`'s global batch: int64 [global_batch / dp_size, seq_len], used as
    both input_ids and labels (the model scores position i on token i+1, and MTP depth d on i+d+1)."""
    if global_batch % dp_size:
        raise ValueError(f"global batch size {global_batch} is not divisible by the {dp_size} data-parallel ranks")
    per_rank = global_batch // dp_size
    offsets = step_offsets(seed, step, global_batch, tokens.size, seq_len)
    offsets = offsets[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    rows = np.stack([np.asarray(tokens[o:o + seq_len], dtype=np.int64) for o in offsets])
    return torch.from_numpy(rows).to(device)


# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonmoe.dsv3.data",
                                     description="Data for the trainer: `prepare` tokenizes a text corpus into a "
                                                 "folder that `train --data DIR` reads (dsv3/prepare.py).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt / .jsonl(.gz) inputs into a folder `train --data` reads")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a folder holding one (and its "
                                                      "tokenizer_config.json)")
    p.add_argument("--input", required=True, nargs="+", action="extend", metavar="PATH",
                   help=".txt (one document), .jsonl / .jsonl.gz (one per line) files, or folders of them")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to create (meta.json + token shards)")
    p.add_argument("--text-field", default="text", help="the jsonl field holding the text (default: text)")
    p.add_argument("--eos", default=None, metavar="TOKEN",
                   help="document separator when tokenizer_config.json names no eos_token")
    p.add_argument("--val-every", type=int, default=VAL_EVERY_DOCUMENT, metavar="N",
                   help=f"hold out every N-th document for validation (default {VAL_EVERY_DOCUMENT})")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per CPU core)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing different --output")
    args = parser.parse_args(argv)
    try:
        prepare(args.tokenizer, args.input, args.output, text_field=args.text_field, eos=args.eos,
                val_every=args.val_every, workers=args.workers, shard_tokens=args.shard_tokens,
                overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output's place (read-only, full disk): one line naming what failed
        print(f"error: {e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume from {args.output}.partial", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
