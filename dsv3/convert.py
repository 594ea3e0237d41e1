"""Streaming checkpoint conversion between the published Hugging Face layout and our DCP layout.

    python -m tritonmoe.dsv3.convert hf2dcp --input HF_DIR --output DCP_DIR [--dtype bf16|fp32] [--overwrite]
    python -m tritonmoe.dsv3.convert dcp2hf --input DCP_DIR --output HF_DIR [--config config.json] [--max-shard-gb N]

hf2dcp in:  config.json + safetensors shards (+ model.safetensors.index.json), bf16/fp32 or FP8 with 128x128
            block scales (dequantized here). Pickled .bin checkpoints are refused.
hf2dcp out: one DCP checkpoint of {"model": our state dict} (expert weights as global [E,...] tensors; parameters
            in --dtype, the routers' weights and balancing biases in fp32), the layout the parallel layer's
            ``load_model_weights`` reads into an FSDP+EP model of any EP degree, plus config.json (the source's;
            ``num_nextn_predict_layers`` is set to 0 when the source has no MTP layers), convert.json (what was
            converted, with which options) and checksums.json (CRC-32 of every file, which parallel.checkpoint
            verifies on every load).
dcp2hf:     the reverse, into config.json + ``model-XXXXX-of-YYYYY.safetensors`` + index (published per-expert
            layout, MTP modules as layers L+k with their embedding/head copies). Any DCP checkpoint with a
            "model" entry works (a training checkpoint too: "optim"/"train" are skipped). The model's config is
            the config.json inside the input (hf2dcp and training checkpoints write one) unless --config is given.

Why streaming: DeepSeek-V3 is ~680 GB in FP8 and 1.3 TB in bf16, so neither direction may hold the model. Both
work one decoder layer at a time with the loops of ``checkpoint.py`` (``load_group``, ``write_hf_checkpoint``):
peak host memory is about one layer's tensors (one MoE layer of V3 is ~22 GB in bf16).

hf2dcp's output: each group is its own DCP save under ``layers/<id>/`` (DCP's FileSystemWriter, default
settings: one file, sync_files=True), with ``source.json`` beside it: the CRC-32s of the source headers and
tensors it was converted from, and of its own files. At the end the parts' metadata, read through the allow-list
reader, are handed to DCP's own ``FileSystemWriter.finish`` with storage entries pointing into the part folders:
DCP pickles, fsyncs and renames the root ``.metadata``, so the result is one checkpoint to any DCP reader and no
DCP internals are written here. (Chosen over one ``dcp.save`` driven layer by layer: that save cannot resume.)

Interruptions: output goes to ``<output>.partial``, fsynced and renamed into place when complete. A rerun resumes:
a finished part is kept when the source headers and the bytes of every tensor it was converted from still have
the recorded CRC-32s (a shard rewritten with the same size and mtime is caught), and redone otherwise. dcp2hf
starts over.

Output folders: hf2dcp writes into a missing or empty folder, or with --overwrite replaces a previous hf2dcp
output once the new one is complete; a folder holding anything else is refused, naming the files. dcp2hf replaces
only a previous HF checkpoint's files (config.json, index, shards) and leaves the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from ..parallel.checkpoint import (CHECKSUM_FILE, CheckpointError, file_crc32, fsync_path, is_complete, load_dcp,
                                   read_dcp_metadata, verify_checksums, write_durable)
from .checkpoint import (HFSource, build_meta_model, check_mtp_copies, load_group, open_hf_checkpoint,
                         write_hf_checkpoint)
from .hf_mapping import CheckpointLayout, Op, check_against, is_mtp_key, ours_groups, plan_hf_keys
from .model import DeepseekV3ForCausalLM
from .safetensors_io import CONFIG_FILE, INDEX_FILE, read_json

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
STATE_KEY = "model"          # the DCP entry holding the model state dict (as training checkpoints name it)
PARTS_DIR = "layers"
INFO_FILE = "convert.json"
RECORD_FILE = "source.json"  # in each part: what it was converted from
FORMAT_VERSION = 2
# What hf2dcp writes at the top of its output folder (and the temporary names of the JSON files it replaces).
OUTPUT_NAMES = frozenset({".metadata", ".metadata.tmp", INFO_FILE, INFO_FILE + ".tmp", CONFIG_FILE,
                          CONFIG_FILE + ".tmp", CHECKSUM_FILE, PARTS_DIR})


class Progress:
    """One line per finished group: groups and shards done, bytes read, MB/s, ETA from bytes left."""

    def __init__(self, what: str, total_groups: int, total_bytes: int, total_shards: int | None,
                 out: Callable[[str], None]):
        self.what, self.total_groups, self.total_bytes, self.total_shards = what, total_groups, total_bytes, total_shards
        self.out, self.t0, self.groups = out, time.monotonic(), 0

    def step(self, label: str, bytes_done: int, shards_done: int | None = None, skipped: bool = False) -> None:
        self.groups += 1
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = bytes_done / dt
        eta = (self.total_bytes - bytes_done) / rate if rate > 0 else float("nan")
        shards = f" shards {shards_done}/{self.total_shards}" if self.total_shards else ""
        self.out(f"[{self.what}] {self.groups}/{self.total_groups} {label}{' (done before)' if skipped else ''}"
                 f"{shards} {bytes_done / 2**20:.1f}/{self.total_bytes / 2**20:.1f} MiB {rate / 2**20:.1f} MiB/s "
                 f"ETA {eta:.0f}s")


def _label(group: int | None, layout: CheckpointLayout) -> str:
    if group is None:
        return "embedding/norm/head"
    if group >= layout.num_hidden_layers:
        return f"MTP module {group - layout.num_hidden_layers} (HF layer {group})"
    return f"layer {group}"


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns on every save/load without a process group; the converter is single-process by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_durable(tmp, text)
    os.replace(tmp, path)


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under root, deepest first (files already synced cost next to nothing)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


# ------------------------------------------------------------------------------------------------------------
# hf2dcp
def _conversion_in(folder: Path) -> dict | None:
    """What an existing hf2dcp output (or .partial) folder holds: None when absent or empty, else the options it
    was written with (its convert.json; {} when unreadable). Refuses, naming them, folders holding other files."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    entries = sorted(p.name for p in folder.iterdir())
    foreign = [n for n in entries if n not in OUTPUT_NAMES]
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" ... ({len(foreign)} files)" if len(foreign) > 8 else "")
        raise ValueError(f"{folder} holds files no conversion wrote ({shown}): refusing to replace it; move them "
                         "away or choose another --output")
    if not entries:
        return None
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _part_name(group: int | None) -> str:
    return "global" if group is None else f"{group:05d}"


def _sources(plan) -> list[str]:
    return [s for m in plan.tensors for s in m.sources]


def _part_reusable(part: Path, sources: list[str], src: HFSource) -> tuple[dict | None, str]:
    """(record, '') when the part under `part` was converted from exactly what the source holds now: its record's
    header CRCs and the CRC of every source tensor's stored bytes (read again here) match; else (None, why not)."""
    if not (part / ".metadata").is_file():
        return None, ""
    try:
        record = json.loads((part / RECORD_FILE).read_text())
        tensors, headers, files = record["tensors"], record["headers"], record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, "it has no readable record of its source"
    if set(tensors) != set(sources):
        return None, "the source holds other tensors for it now"
    ckpt = src.ckpt
    for f, crc in headers.items():
        if ckpt.header_crcs.get(f) != crc:
            return None, f"the header of {f} changed"
    for name in sources:
        changed = ckpt.fingerprint(name) != tensors[name]
        ckpt.release()
        if changed:
            return None, f"the bytes of {name} changed"
    if not all((part.parent.parent / f).is_file() for f in files):
        return None, "files of it are missing"
    return record, ""


def _first_stale_part(root: Path, plans: dict, src: HFSource) -> str | None:
    """None when every part of a finished output still matches the source (``_part_reusable``), else the first
    part that does not and why."""
    for g, plan in plans.items():
        record, why = _part_reusable(root / PARTS_DIR / _part_name(g), _sources(plan), src)
        if record is None:
            return f"{_label(g, src.layout)}: {why or 'it is missing'}"
    return None


def _shard_files(sources: list[str], src: HFSource) -> set[str]:
    ckpt = src.ckpt
    return {ckpt.weight_map[n] for s in sources for n in (s, ckpt.scales.get(s)) if n is not None}


class _BufferPool:
    """The tensors of the group just saved, handed to the next group (every MoE layer has the same shapes).
    Fresh tensors per layer meant fresh pages to fault in: on the 1.4 GB synthetic checkpoint hf2dcp took 3.1 s
    with 351k page faults and 2.0 s of sys time without the pool, 1.75 s with 36k faults and 0.6 s of sys time
    with it. It also keeps the peak at one layer whatever the allocator keeps (on 16-32 MiB tensors glibc's heap
    kept freed layers: peak RSS growth 1.1-1.7x the largest layer from run to run, 1.15x with the pool)."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def give(self, tensors) -> None:
        for t in tensors:
            self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)

    def keep_only(self, needs: list[tuple]) -> None:
        """Free every pooled tensor the next group (`needs`: (shape, dtype) of each of its tensors) cannot use,
        before it allocates anything."""
        wanted = Counter(needs)
        self._free = {k: v[: wanted[k]] for k, v in self._free.items() if wanted[k]}

    def empty(self, shape, dtype, device=None) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)


def hf2dcp(input_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
           ignore_mtp_copies: bool = False, overwrite: bool = False,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Convert an HF safetensors checkpoint into a weights-only DCP checkpoint; returns run statistics."""
    def report(msg: str) -> None:
        log(f"[hf2dcp] {msg}")

    src = open_hf_checkpoint(input_dir, DeepseekV3ForCausalLM, missing_mtp="drop", report=report)
    info = json.loads(json.dumps({"format_version": FORMAT_VERSION, "direction": "hf2dcp",
                                  "dtype": str(dtype).removeprefix("torch."), "ignore_mtp_copies": ignore_mtp_copies,
                                  "source": str(src.ckpt.path.resolve())}))
    plans = {g: plan_hf_keys(keys, src.layout) for g, keys in src.ckpt.groups().items()}
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".partial")
    previous = _conversion_in(out)
    if previous is not None:
        if previous == info and (out / ".metadata").is_file():
            why = _first_stale_part(out, plans, src)
            if why is None:
                report(f"{out} already holds this conversion of the source as it is now; nothing to do")
                return {"skipped": True}
            if not overwrite:
                raise ValueError(f"output {out} holds this conversion of an earlier state of {src.ckpt.path} ({why}); "
                                 "pass --overwrite to convert it again")
        elif not overwrite:
            raise ValueError(f"output {out} exists and is not this conversion; pass --overwrite to replace it")
    partial = _conversion_in(tmp)
    if partial is not None and partial != info:
        report(f"removing {tmp}: left by a conversion of another source or with other options")
        shutil.rmtree(tmp)
    (tmp / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    _atomic_write(tmp / INFO_FILE, json.dumps(info, indent=2))

    t0 = time.monotonic()
    files, stats = _convert_parts(src, plans, tmp, dtype, ignore_mtp_copies, log)
    _merge_parts(tmp, [_part_name(g) for g in plans])
    _atomic_write(tmp / CONFIG_FILE, json.dumps(_plain_config(src.hf_cfg, log), indent=2) + "\n")
    for p in [tmp / ".metadata", tmp / CONFIG_FILE, tmp / INFO_FILE] + [tmp / PARTS_DIR / _part_name(g) / RECORD_FILE
                                                                        for g in plans]:
        files[p.relative_to(tmp).as_posix()] = file_crc32(p)
    write_durable(tmp / CHECKSUM_FILE, json.dumps({"algorithm": "crc32", "files": dict(sorted(files.items()))},
                                                  indent=1))
    _fsync_tree(tmp)
    _publish_dir(tmp, out)
    seconds = time.monotonic() - t0
    report(f"wrote {out}: {stats['bytes_read'] / 2**20:.1f} MiB read in {seconds:.1f}s "
           f"({stats['bytes_read'] / 2**20 / max(seconds, 1e-9):.1f} MiB/s)")
    return {"skipped": False, **stats, "seconds": seconds}


def _convert_parts(src: HFSource, plans: dict, tmp: Path, dtype: torch.dtype, ignore_mtp_copies: bool,
                   log: Callable[[str], None]) -> tuple[dict[str, str], dict]:
    """Convert each group the .partial folder `tmp` does not hold a matching part of into ``layers/<id>/`` (a DCP
    save, then its record). Returns the CRC-32 of every part file (for checksums.json) and byte counts."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    def report(msg: str) -> None:
        log(f"[hf2dcp] {msg}")

    ckpt, layout, groups = src.ckpt, src.layout, src.ckpt.groups()
    shard_groups: dict[str, set] = {}
    for g, plan in plans.items():
        for f in _shard_files(_sources(plan), src):
            shard_groups.setdefault(f, set()).add(g)
    progress = Progress("hf2dcp", len(plans), sum(ckpt.nbytes(k) for k in ckpt.keys()), len(shard_groups), log)
    pool = _BufferPool()
    crcs: dict[str, str] = {}   # HF name -> CRC-32 of its stored bytes, for the MTP-copy check
    files: dict[str, str] = {}  # file of the output -> CRC-32, for checksums.json
    done_groups: set = set()
    bytes_done, bytes_converted = 0, 0
    for g, plan in plans.items():
        part = tmp / PARTS_DIR / _part_name(g)
        sources = _sources(plan)
        group_bytes = sum(ckpt.nbytes(k) for k in groups[g])
        record, why = _part_reusable(part, sources, src)
        if record is None:
            if why:
                report(f"{_label(g, layout)}: {why} since it was converted; converting it again")
            shutil.rmtree(part, ignore_errors=True)  # a group interrupted mid-write is redone from scratch
            pool.keep_only([(tuple(src.expected[m.key].shape), src.dtype_of(m.key, dtype))
                            for m in plan.tensors if m.op is not Op.SHARED])
            tensors = load_group(src, groups[g], dtype, crcs, ignore_mtp_copies, report, empty=pool.empty)
            bytes_converted += sum(t.numel() * t.element_size() for t in tensors.values())
            try:
                with _single_process_dcp():
                    dcp.save({STATE_KEY: tensors}, storage_writer=dcp.FileSystemWriter(part), no_dist=True)
            except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
                raise CheckpointError(f"cannot write {part}: {_one_line(e)}") from e
            pool.give(tensors.values())
            del tensors
            # The part counts as done once its record is written, after DCP has written and fsynced its files.
            part_files = {p.relative_to(tmp).as_posix(): file_crc32(p) for p in sorted(part.iterdir())
                          if p.is_file()}
            _atomic_write(part / RECORD_FILE, json.dumps({
                "tensors": {n: crcs[n] for n in sources},
                "headers": {f: ckpt.header_crcs[f] for f in sorted(_shard_files(sources, src))},
                "files": part_files}, indent=1))
            files.update(part_files)
        else:
            crcs.update(record["tensors"])
            check_mtp_copies(src, plan.tensors, crcs, ignore_mtp_copies, report)
            files.update(record["files"])
        bytes_done += group_bytes
        done_groups.add(g)
        progress.step(_label(g, layout), bytes_done, _shards_done(shard_groups, done_groups),
                      skipped=record is not None)
    return files, {"bytes_read": bytes_done, "bytes_written": bytes_converted}


def _publish_dir(tmp: Path, out: Path) -> None:
    """Rename a finished (fsynced) output folder into place: onto an empty or absent `out`, or in place of a
    previous conversion (``_conversion_in`` checked that it holds nothing else), which is removed afterwards."""
    old = out.with_name(f".{out.name}.old")
    if out.exists() and any(out.iterdir()):
        if old.exists():
            _conversion_in(old)  # our own leftover from an interrupted replacement, else refused
            shutil.rmtree(old)
        out.rename(old)
    os.replace(tmp, out)
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _plain_config(hf_cfg: dict, log: Callable[[str], None]) -> dict:
    """The config.json for dequantized weights: the source's without its ``quantization_config`` (the published
    checkpoint's FP8 block scheme). Kept, transformers would treat the written bf16/fp32 weights as an FP8
    checkpoint (it demands accelerate, then re-quantizes them). Everything else is kept as the source has it."""
    if "quantization_config" not in hf_cfg:
        return hf_cfg
    log("[convert] dropping quantization_config from config.json: the weights are written dequantized")
    return {k: v for k, v in hf_cfg.items() if k != "quantization_config"}


def _shards_done(shard_groups: dict[str, set], done: set) -> int:
    return sum(1 for gs in shard_groups.values() if gs <= done)


def _merge_parts(root: Path, parts: list[str]) -> None:
    """One DCP .metadata for all per-layer checkpoints under root/layers/, written by DCP's FileSystemWriter.finish
    from the parts' own metadata and storage records, their paths pointing into the part folders."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.storage import WriteResult

    state_dict_metadata, planner_data, results = {}, {}, []
    for name in parts:
        rel = f"{PARTS_DIR}/{name}"
        md = read_dcp_metadata(root / rel)
        clash = set(md.state_dict_metadata) & set(state_dict_metadata)
        assert not clash, f"two layer groups wrote {sorted(clash)[:3]}"
        state_dict_metadata.update(md.state_dict_metadata)
        planner_data.update(md.planner_data or {})
        results += [WriteResult(index=index, size_in_bytes=info.length,
                                storage_data=dataclasses.replace(info, relative_path=f"{rel}/{info.relative_path}"))
                    for index, info in md.storage_data.items()]
    FileSystemWriter(root).finish(Metadata(state_dict_metadata=state_dict_metadata, planner_data=planner_data),
                                  [results])


# ------------------------------------------------------------------------------------------------------------
# dcp2hf
def dcp2hf(input_dir: str | os.PathLike, output_dir: str | os.PathLike, config: str | os.PathLike | None = None,
           max_shard_bytes: int = 5 * 2**30,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Convert the "model" entry of a DCP checkpoint into an HF safetensors checkpoint; returns statistics."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    src = Path(input_dir)
    if not src.is_dir():
        raise ValueError(f"--input {src}: no such folder")
    if not is_complete(src):
        raise ValueError(f"{src} is not a complete DCP checkpoint (no .metadata)")
    cfg_path = Path(config) if config is not None else src / CONFIG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"no config: {cfg_path} does not exist (hf2dcp output and training checkpoints hold one); "
                         "pass --config with the model's config.json")
    hf_cfg = read_json(cfg_path)
    layout = CheckpointLayout.from_hf_config(hf_cfg, cfg_path)
    verify_checksums(src)
    md = read_dcp_metadata(src)
    stored: dict[str, TensorStorageMetadata] = {}
    for fqn, meta in md.state_dict_metadata.items():
        path = (md.planner_data or {}).get(fqn)
        if path is not None and len(path) == 2 and path[0] == STATE_KEY:
            key = path[1]
        elif path is None and fqn.startswith(STATE_KEY + "."):
            key = fqn[len(STATE_KEY) + 1:]
        else:
            continue
        if isinstance(meta, TensorStorageMetadata):
            stored[key] = meta
    if not stored:
        raise ValueError(f"{src} has no '{STATE_KEY}' entry with tensors")
    expected = build_meta_model(hf_cfg, DeepseekV3ForCausalLM, source=cfg_path).state_dict()
    has_mtp = any(is_mtp_key(k) for k in stored)
    check_against(stored, expected, layout, skip_missing=is_mtp_key if not has_mtp else None)
    for key, meta in stored.items():
        if tuple(meta.size) != tuple(expected[key].shape):
            raise ValueError(f"{key}: shape {tuple(meta.size)} in {src} does not match {tuple(expected[key].shape)} "
                             f"of the model built from {cfg_path}")
    files_of: dict[str, set[str]] = {}
    for index, info in md.storage_data.items():
        files_of.setdefault(index.fqn, set()).add(info.relative_path)

    # One tensor per DCP read (DCP's reader holds a second copy of what it reads: whole groups took dcp2hf's peak
    # to 2.35x the largest layer), except runs of small tensors, which are read together: each read unpickles the
    # whole .metadata again, which took 15% of the time one tensor at a time.
    def nbytes(key: str) -> int:
        return stored[key].size.numel() * stored[key].properties.dtype.itemsize

    groups = ours_groups(stored, layout)
    small = max(map(nbytes, stored)) // 8
    batch_of: dict[str, list[str]] = {}
    for keys in groups.values():
        run: list[str] = []
        for key in keys + [None]:
            if run and (key is None or nbytes(key) > small or sum(map(nbytes, run)) + nbytes(key) > small):
                batch_of.update(dict.fromkeys(run, run))
                run = []
            if key is not None:
                run.append(key)
    read_ahead: dict[str, torch.Tensor] = {}

    def load(key: str) -> torch.Tensor:
        if key in read_ahead:
            return read_ahead.pop(key)
        sd = {k: torch.empty(tuple(stored[k].size), dtype=stored[k].properties.dtype) for k in batch_of[key]}
        files = ", ".join(sorted(set().union(*(files_of.get(f"{STATE_KEY}.{k}", set()) for k in sd))))
        with _single_process_dcp():
            load_dcp({STATE_KEY: sd}, src, no_dist=True, what=f"cannot read {key} (from {files}) of")
        read_ahead.update(sd)
        return read_ahead.pop(key)

    out_cfg = hf_cfg  # `layout` stays the one of the model's config: MTP keys are mapped by it
    if not has_mtp and layout.num_mtp_layers:
        out_cfg = {**out_cfg, "num_nextn_predict_layers": 0}
    # DCP never holds FP8 (hf2dcp dequantizes), so a --config taken from the published FP8 checkpoint must lose
    # its quantization_config here too.
    out_cfg = _plain_config(out_cfg, log)
    out = Path(output_dir)
    total = sum(m.size.numel() * m.properties.dtype.itemsize for m in stored.values())
    progress = Progress("dcp2hf", len(groups), total, None, log)
    done, t0 = 0, time.monotonic()
    main_cache: dict[str, torch.Tensor] = {}  # embedding/head, read only for MTP groups, which copy them

    def get_main(key: str) -> torch.Tensor:
        if key not in main_cache:
            main_cache[key] = load(key)
        return main_cache[key]

    def after_group(g: int | None) -> None:
        nonlocal done
        done += sum(stored[k].size.numel() * stored[k].properties.dtype.itemsize for k in groups[g])
        main_cache.clear()
        progress.step(_label(g, layout), done)

    specs = {k: (tuple(m.size), m.properties.dtype) for k, m in stored.items()}
    write_hf_checkpoint(out, out_cfg, layout, specs, load, get_main, max_shard_bytes, after_group)
    seconds = time.monotonic() - t0
    log(f"[dcp2hf] wrote {out}: {done / 2**20:.1f} MiB in {seconds:.1f}s ({done / 2**20 / max(seconds, 1e-9):.1f} MiB/s)")
    return {"bytes": done, "seconds": seconds, "index": str(out / INDEX_FILE)}


# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonmoe.dsv3.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf2dcp", help="HF safetensors (bf16/fp32/FP8) -> DCP weights-only checkpoint")
    a.add_argument("--input", required=True, help="HF checkpoint folder (config.json + safetensors)")
    a.add_argument("--output", required=True, help="DCP checkpoint folder to create (missing or empty)")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="parameter dtype (buffers and the routers stay fp32)")
    a.add_argument("--ignore-mtp-copies", action="store_true",
                   help="drop MTP embed_tokens/shared_head.head even when they differ from the main tensors")
    a.add_argument("--overwrite", action="store_true", help="replace a previous hf2dcp output (nothing else)")
    b = sub.add_parser("dcp2hf", help="DCP checkpoint ('model' entry) -> HF safetensors")
    b.add_argument("--input", required=True, help="DCP checkpoint folder")
    b.add_argument("--output", required=True, help="HF checkpoint folder to write")
    b.add_argument("--config", default=None, help="config.json (default: the one inside --input, which hf2dcp "
                                                   "output and training checkpoints hold)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (GB, > 0)")
    args = parser.parse_args(argv)
    try:
        if args.command == "hf2dcp":
            hf2dcp(args.input, args.output, DTYPES[args.dtype], args.ignore_mtp_copies, args.overwrite)
        else:
            if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
                raise ValueError(f"--max-shard-gb must be a size in GB > 0, got {args.max_shard_gb}")
            dcp2hf(args.input, args.output, args.config, max(1, int(args.max_shard_gb * 2**30)))
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
