"""Training data for the example trainer: token streams and deterministic batches.

In: nothing (the default corpus: the Python standard library's own .py sources, present on every machine
with Python, read byte-level so vocab = 256), a user text file or folder (byte-level too), or a
pre-tokenized file of uint16/uint32 token ids (read through np.memmap, never loaded whole).
Out: a `Corpus` with a train and a held-out validation token stream, and `batch(...)`, which returns the
sequences of one rank's share of step s's global batch.

Determinism: the global batch of step s is B windows of seq_len tokens at offsets drawn from a generator
seeded with (seed, s) only. Data-parallel rank r of W takes sequences [r*B/W, (r+1)*B/W). So the same
sequences are trained on at step s whatever the world size or EP degree, and resuming at step s needs no
data-loader state beyond s itself.
"""

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
VAL_EVERY = 20  # folders: every 20th file (sorted order) is held out for validation
VAL_FRACTION = 0.05  # single files: the last 5% of the tokens are held out


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # 1-D token ids (uint8 bytes, or a uint16/uint32 memmap)
    val: np.ndarray  # held-out 1-D token ids, same dtype
    vocab_size: int  # ids are < vocab_size (256 for bytes)
    description: str  # one line for the log


def _sorted_files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files under root in sorted relative-path order (os.walk order differs between machines)."""
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS and not x.startswith(".")]
        files += [Path(d) / n for n in names if suffixes is None or n.endswith(suffixes)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _bytes_corpus(files: list[Path], description: str) -> Corpus:
    if not files:
        raise ValueError(f"no input files for {description}")
    if len(files) >= VAL_EVERY:
        val_files = files[VAL_EVERY - 1::VAL_EVERY]
        train_files = [f for i, f in enumerate(files) if i % VAL_EVERY != VAL_EVERY - 1]
        train = np.frombuffer(b"\n".join(f.read_bytes() for f in train_files), dtype=np.uint8)
        val = np.frombuffer(b"\n".join(f.read_bytes() for f in val_files), dtype=np.uint8)
        return Corpus(train, val, 256, f"{description}: {len(train_files)} files / {train.size:,} bytes train, "
                                       f"{len(val_files)} files / {val.size:,} bytes validation")
    data = np.frombuffer(b"\n".join(f.read_bytes() for f in files), dtype=np.uint8)
    return _split_tail(data, 256, description)


def _split_tail(data: np.ndarray, vocab_size: int, description: str) -> Corpus:
    n_val = max(1, int(data.size * VAL_FRACTION))
    train, val = data[:-n_val], data[-n_val:]
    return Corpus(train, val, vocab_size,
                  f"{description}: {train.size:,} tokens train, {val.size:,} tokens validation")


def stdlib_corpus() -> Corpus:
    """The Python standard library's .py files (third-party site-packages excluded), byte-level."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _bytes_corpus(_sorted_files(root, (".py",)), f"Python stdlib sources in {root}")


def load_corpus(data: str | os.PathLike | None = None, token_dtype: str | None = None) -> Corpus:
    """data=None: the stdlib corpus. A folder: every file in it, byte-level. A file: its bytes, or, with
    token_dtype 'uint16' / 'uint32', a flat array of token ids of that type (memory-mapped)."""
    if data is None:
        if token_dtype is not None:
            raise ValueError(f"--data-dtype {token_dtype} needs --data (a token file)")
        return stdlib_corpus()
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or folder")
    if token_dtype is not None:
        if token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"token dtype must be uint16 or uint32, got {token_dtype!r}")
        if not path.is_file():
            raise ValueError(f"--data {path}: a token file must be a file, not a folder")
        tokens = np.memmap(path, dtype=np.dtype(token_dtype), mode="r")
        if tokens.size < 2:
            raise ValueError(f"--data {path}: holds {tokens.size} tokens")
        # The max over a memmap reads the file once; it sets the vocabulary a model must at least cover.
        return _split_tail(tokens, int(tokens.max()) + 1, f"{token_dtype} tokens in {path}")
    if path.is_dir():
        return _bytes_corpus(_sorted_files(path, None), f"text files in {path}")
    return _split_tail(np.frombuffer(path.read_bytes(), dtype=np.uint8), 256, f"text file {path}")


def step_offsets(seed: int, step: int, global_batch: int, n_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets [global_batch] of step `step`'s windows (seq_len tokens each); a function of
    (seed, step) only."""
    if n_tokens < seq_len:
        raise ValueError(f"corpus of {n_tokens} tokens is shorter than one sequence of {seq_len}")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len + 1, size=global_batch, dtype=np.int64)


def batch(tokens: np.ndarray, seed: int, step: int, global_batch: int, seq_len: int, dp_rank: int = 0,
          dp_size: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """This rank's share of step `step`'s global batch: int64 [global_batch / dp_size, seq_len], used as
    both input_ids and labels (the model scores position i on token i+1, and MTP depth d on i+d+1)."""
    if global_batch % dp_size:
        raise ValueError(f"global batch size {global_batch} is not divisible by the {dp_size} data-parallel ranks")
    per_rank = global_batch // dp_size
    offsets = step_offsets(seed, step, global_batch, tokens.size, seq_len)
    offsets = offsets[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    rows = np.stack([np.asarray(tokens[o:o + seq_len], dtype=np.int64) for o in offsets])
    return torch.from_numpy(rows).to(device)
