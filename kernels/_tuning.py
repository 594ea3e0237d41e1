"""Tile configurations of the GEMM families (grouped_gemm.py, fp8.py), in one place: a config pinned through
an environment variable, one autotuner per rows-per-group bucket, and the launch that takes the interpreter's
small tiles on CPU and the tuned configs on a GPU. Host-side shapes only: nothing here reads group sizes."""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Sequence

import triton

_AUTOTUNED: dict = {}


def block_g(num_groups: int) -> int:
    """BLOCK_G of the kernels: the next power of two >= G (the whole size vector is loaded at once)."""
    return triton.next_power_of_2(max(num_groups, 1))


def rows_bucket(M: int, G: int) -> int:
    """Rows per group rounded up to a power of two in [64, 8192]: the autotuning bucket."""
    return min(max(triton.next_power_of_2(max(M // max(G, 1), 1)), 64), 8192)


def pinned_config(env: str, cls: type[NamedTuple], fields: str, n_blocks: int, max_block_n: int | None = None):
    """The config pinned by environment variable `env` ("v1,v2,..." in the order `fields` names), or None.
    ValueError naming the variable for anything but len(cls._fields) integers whose first n_blocks are
    powers of two >= 16 (and, with max_block_n, a second block size <= max_block_n)."""
    spec = os.environ.get(env)
    if not spec:
        return None
    try:
        cfg = cls(*(int(v) for v in spec.split(",")))
    except (TypeError, ValueError):
        raise ValueError(f"{env}={spec!r}: expected {len(cls._fields)} integers '{fields}'") from None
    if any(b < 16 or b & (b - 1) for b in cfg[:n_blocks]) or (max_block_n is not None and cfg[1] > max_block_n):
        limit = "" if max_block_n is None else f", the second <= {max_block_n}"
        raise ValueError(f"{env}={spec!r}: block sizes must be powers of two >= 16{limit}")
    return cfg


def autotuned(kernel, configs: Sequence[NamedTuple], names: Sequence[str], key: Sequence[str], bucket: int):
    """triton.autotune over `configs` (their first len(names) fields are the block sizes `names`, then
    num_warps and num_stages), keyed on `key` (shape and layout arguments; Triton adds the dtypes), one tuner
    per rows-per-group bucket. M itself changes every step with routing and must not trigger re-tuning, but
    the best tile differs between 128 and 8192 rows per group: a single tuner keyed on (N, D) would keep
    whatever won on the first batch it saw."""
    cache_key = (kernel, tuple(configs), tuple(names), tuple(key), bucket)
    if cache_key not in _AUTOTUNED:
        n = len(names)
        _AUTOTUNED[cache_key] = triton.autotune(
            configs=[triton.Config(dict(zip(names, c[:n])), num_warps=c[n], num_stages=c[n + 1]) for c in configs],
            key=list(key),
        )(kernel)
    return _AUTOTUNED[cache_key]


def launch(kernel, grid: Callable[[dict], tuple], args: tuple, *, names: Sequence[str], key: Sequence[str],
           bucket: int, interpret: bool, interpreter_config: NamedTuple, pinned: NamedTuple | None,
           configs: Callable[[], list], interpret_kw: dict, compiled_kw: dict, **constexprs) -> None:
    """One launch of a tiled GEMM kernel: under the interpreter the pinned or the small interpreter config,
    compiled the tuner of (configs(), key, bucket), or the pinned config alone."""
    if interpret:
        meta = dict(zip(names, pinned or interpreter_config))
        kernel[grid(meta)](*args, **meta, **constexprs, **interpret_kw)
        return
    tuned = autotuned(kernel, [pinned] if pinned else configs(), names, key, 0 if pinned else bucket)
    tuned[grid](*args, **constexprs, **compiled_kw)
