"""Streaming checkpoint conversion between the published Hugging Face layout and our DCP layout.

    python -m tritonmoe.dsv3.convert hf2dcp --input HF_DIR --output DCP_DIR [--dtype bf16|fp32]
    python -m tritonmoe.dsv3.convert dcp2hf --input DCP_DIR --output HF_DIR [--config config.json]

hf2dcp in:  config.json + safetensors shards (+ model.safetensors.index.json), bf16/fp32 or FP8 with 128x128
            block scales (dequantized here). Pickled .bin checkpoints are refused.
hf2dcp out: one DCP checkpoint of {"model": our state dict} (expert weights as global [E,...] tensors), the
            layout the parallel layer's ``load_model_weights`` reads into an FSDP+EP model of any EP degree,
            plus config.json (the source's; ``num_nextn_predict_layers`` is set to 0 when the source has no MTP
            layers) and convert.json (what was converted, with which options).
dcp2hf:     the reverse, into config.json + ``model-XXXXX-of-YYYYY.safetensors`` + index (published per-expert
            layout, MTP modules as layers L+k with their embedding/head copies). Any DCP checkpoint with a
            "model" entry works (a training checkpoint too: "optim"/"train" are skipped). The model's config is
            the config.json inside the input (hf2dcp and training checkpoints write one) unless --config is given.

Why streaming: DeepSeek-V3 is ~680 GB in FP8 and 1.3 TB in bf16, so neither direction may hold the model.
Both work one decoder layer at a time (the key mapping of ``checkpoint.py`` applies per HF layer): peak host
memory is about one layer's tensors (one MoE layer of V3 is ~22 GB in bf16). hf2dcp writes each layer as its
own small DCP checkpoint under ``layers/<id>/`` and finally merges their metadata into one ``.metadata`` whose
storage entries point into those folders, so DCP reads the result as a single checkpoint.

Interruptions: output goes to ``<output>.partial`` and is renamed when complete. hf2dcp keeps finished layers
of a partial run with the same source and options and redoes only the rest; dcp2hf starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (CONFIG_FILE, EMBED, INDEX_FILE, CheckpointLayout, MappedTensor, Op, SafetensorsCheckpoint,
                         check_against, describe_key_problems, load_mapped, mtp_layers_present, ours_groups,
                         plan_hf_keys, write_hf_checkpoint)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
STATE_KEY = "model"          # the DCP entry holding the model state dict (PLAN.md)
PARTS_DIR = "layers"
INFO_FILE = "convert.json"
FORMAT_VERSION = 1


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


def _expected_state(hf_cfg: dict) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Our model's state dict (meta tensors: names, shapes, dtypes) and buffer names, from a config dict."""
    from .config import DeepseekV3Config
    from .model import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf(hf_cfg))
    return model.state_dict(), {n for n, _ in model.named_buffers()}


def _digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()


def _source_fingerprint(ckpt: SafetensorsCheckpoint) -> dict:
    files = {f: (s.st_size, s.st_mtime_ns) for f in ckpt.files() for s in [(ckpt.path / f).stat()]}
    return {"source": str(ckpt.path.resolve()), "files": files}


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns on every save/load without a process group; the converter is single-process by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------
def hf2dcp(input_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
           ignore_mtp_copies: bool = False, overwrite: bool = False,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Convert an HF safetensors checkpoint into a weights-only DCP checkpoint; returns run statistics."""
    import torch.distributed.checkpoint as dcp

    ckpt = SafetensorsCheckpoint(input_dir)
    hf_cfg = ckpt.config()
    layout = CheckpointLayout.from_hf_config(hf_cfg)
    if layout.num_mtp_layers and not mtp_layers_present(ckpt.keys(), layout):
        log(f"[hf2dcp] config.json asks for {layout.num_mtp_layers} MTP module(s) but the checkpoint has no layer "
            f">= {layout.num_hidden_layers}: converting without MTP (config.json written with "
            "num_nextn_predict_layers=0)")
        hf_cfg = {**hf_cfg, "num_nextn_predict_layers": 0}
        layout = CheckpointLayout.from_hf_config(hf_cfg)
    expected, buffers = _expected_state(hf_cfg)
    groups = ckpt.groups()
    full_plan = plan_hf_keys(ckpt.keys(), layout)
    check_against([t.key for t in full_plan.tensors if t.op is not Op.SHARED], expected, layout, full_plan)

    info = {"format_version": FORMAT_VERSION, "direction": "hf2dcp", "dtype": str(dtype).removeprefix("torch."),
            "ignore_mtp_copies": ignore_mtp_copies, **_source_fingerprint(ckpt)}
    info = json.loads(json.dumps(info))  # the form it is compared in after a JSON round trip
    out = Path(output_dir)
    if out.exists():
        done = out / INFO_FILE
        if done.is_file() and json.loads(done.read_text()) == info and (out / ".metadata").is_file():
            log(f"[hf2dcp] {out} already holds this conversion; nothing to do")
            return {"skipped": True}
        if not overwrite:
            raise ValueError(f"output {out} exists and is not this conversion; pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists() and not ((tmp / INFO_FILE).is_file() and json.loads((tmp / INFO_FILE).read_text()) == info):
        log(f"[hf2dcp] removing {tmp}: left by a conversion of another source or with other options")
        shutil.rmtree(tmp)
    (tmp / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    _atomic_write(tmp / INFO_FILE, json.dumps(info, indent=2))
    digest_file = tmp / "main_digests.json"

    shard_groups: dict[str, set] = {}
    for g, keys in groups.items():
        for k in keys:
            for name in (k, ckpt.scales.get(k)):
                if name is not None:
                    shard_groups.setdefault(ckpt.weight_map[name], set()).add(g)
    total_bytes = sum(ckpt.nbytes(k) for k in ckpt.keys())
    progress = Progress("hf2dcp", len(groups), total_bytes, len(shard_groups), log)
    done_groups: set = set()
    bytes_done, t0, bytes_converted = 0, time.monotonic(), 0
    for g, keys in groups.items():
        part = tmp / PARTS_DIR / _part_name(g)
        group_bytes = sum(ckpt.nbytes(k) for k in keys)
        if (part / ".metadata").is_file():
            bytes_done += group_bytes
            done_groups.add(g)
            progress.step(_label(g, layout), bytes_done, _shards_done(shard_groups, done_groups), skipped=True)
            continue
        shutil.rmtree(part, ignore_errors=True)  # a group interrupted mid-write is redone from scratch
        digests = json.loads(digest_file.read_text()) if digest_file.is_file() else {}
        tensors = {}
        plan = plan_hf_keys(keys, layout)
        problems = describe_key_problems(plan.missing, plan.unexpected)
        if problems:
            raise ValueError(f"{_label(g, layout)}: {problems}")
        for mapped in plan.tensors:
            t = load_mapped(ckpt, mapped, expected[mapped.key], mapped.key in buffers, dtype)
            if mapped.op is Op.SHARED:
                _check_digest(mapped, t, digests, ignore_mtp_copies, log)
            else:
                tensors[mapped.key] = t
                bytes_converted += t.numel() * t.element_size()
            # Unmap the source pages this tensor touched: they count as resident memory until released.
            ckpt.release()
        if g is None:
            _atomic_write(digest_file, json.dumps({k: _digest(tensors[k]) for k in (EMBED, layout.head_key())
                                                   if k in tensors}))
        with _single_process_dcp():
            dcp.save({STATE_KEY: tensors}, storage_writer=dcp.FileSystemWriter(part), no_dist=True)
        del tensors
        bytes_done += group_bytes
        done_groups.add(g)
        progress.step(_label(g, layout), bytes_done, _shards_done(shard_groups, done_groups))

    _merge_parts(tmp, [_part_name(g) for g in groups])
    _atomic_write(tmp / CONFIG_FILE, json.dumps(_plain_config(hf_cfg, log), indent=2) + "\n")
    digest_file.unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    seconds = time.monotonic() - t0
    log(f"[hf2dcp] wrote {out}: {bytes_done / 2**20:.1f} MiB read in {seconds:.1f}s "
        f"({bytes_done / 2**20 / max(seconds, 1e-9):.1f} MiB/s)")
    return {"skipped": False, "bytes_read": bytes_done, "bytes_written": bytes_converted, "seconds": seconds}


def _plain_config(hf_cfg: dict, log: Callable[[str], None]) -> dict:
    """The config.json for dequantized weights: the source's without its ``quantization_config`` (the published
    checkpoint's FP8 block scheme). Kept, transformers would treat the written bf16/fp32 weights as an FP8
    checkpoint (it demands accelerate, then re-quantizes them). Everything else is kept as the source has it."""
    if "quantization_config" not in hf_cfg:
        return hf_cfg
    log("[convert] dropping quantization_config from config.json: the weights are written dequantized")
    return {k: v for k, v in hf_cfg.items() if k != "quantization_config"}


def _part_name(group: int | None) -> str:
    return "global" if group is None else f"{group:05d}"


def _shards_done(shard_groups: dict[str, set], done: set) -> int:
    return sum(1 for gs in shard_groups.values() if gs <= done)


def _check_digest(mapped: MappedTensor, t: torch.Tensor, digests: dict, ignore: bool, log) -> None:
    main = digests.get(mapped.key)
    if main == _digest(t):
        return
    msg = (f"{mapped.sources[0]} differs from {mapped.key}, which our model shares with the MTP module (the published "
           "DeepSeek-V3 stores identical copies)")
    if not ignore:
        raise ValueError(msg + "; pass --ignore-mtp-copies to drop the copy and use the main tensor")
    log(f"[hf2dcp] warning: {msg}; dropped")


def _merge_parts(root: Path, parts: list[str]) -> None:
    """One DCP .metadata for all per-layer checkpoints under root/layers/, storage paths pointing into them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    merged = Metadata(state_dict_metadata={}, planner_data={}, storage_data={})
    for name in parts:
        rel = f"{PARTS_DIR}/{name}"
        md = FileSystemReader(root / rel).read_metadata()
        clash = set(md.state_dict_metadata) & set(merged.state_dict_metadata)
        assert not clash, f"two layer groups wrote {sorted(clash)[:3]}"
        merged.state_dict_metadata.update(md.state_dict_metadata)
        merged.planner_data.update(md.planner_data or {})
        for index, info in md.storage_data.items():
            merged.storage_data[index] = dataclasses.replace(info, relative_path=f"{rel}/{info.relative_path}")
        merged.version = md.version
    tmp = root / ".metadata.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(merged, f)
    os.replace(tmp, root / ".metadata")


# ------------------------------------------------------------------------------------------------------------
def dcp2hf(input_dir: str | os.PathLike, output_dir: str | os.PathLike, config: str | os.PathLike | None = None,
           max_shard_bytes: int = 5 * 2**30,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Convert the "model" entry of a DCP checkpoint into an HF safetensors checkpoint; returns statistics."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..parallel.checkpoint import is_complete

    src = Path(input_dir)
    if not is_complete(src):
        raise ValueError(f"{src} is not a complete DCP checkpoint (no .metadata)")
    cfg_path = Path(config) if config is not None else src / CONFIG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"no config: {cfg_path} does not exist (hf2dcp output and training checkpoints hold one); "
                         "pass --config with the model's config.json")
    hf_cfg = json.loads(cfg_path.read_text())
    layout = CheckpointLayout.from_hf_config(hf_cfg)
    md = FileSystemReader(src).read_metadata()
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
    expected, _ = _expected_state(hf_cfg)
    has_mtp = any(k.startswith("model.mtp.") for k in stored)
    check_against(stored, expected, layout,
                  skip_missing=(lambda k: k.startswith("model.mtp.")) if not has_mtp else None)
    for key, meta in stored.items():
        if tuple(meta.size) != tuple(expected[key].shape):
            raise ValueError(f"{key}: shape {tuple(meta.size)} in {src} does not match {tuple(expected[key].shape)} "
                             f"of the model built from {cfg_path}")

    def load(keys) -> dict[str, torch.Tensor]:
        sd = {k: torch.empty(tuple(stored[k].size), dtype=stored[k].properties.dtype) for k in keys}
        with _single_process_dcp():
            dcp.load({STATE_KEY: sd}, storage_reader=FileSystemReader(src),
                     planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        return sd

    out_cfg = hf_cfg  # `layout` stays the one of the model's config: MTP keys are mapped by it
    if not has_mtp and layout.num_mtp_layers:
        out_cfg = {**out_cfg, "num_nextn_predict_layers": 0}
    # DCP never holds FP8 (hf2dcp dequantizes), so a --config taken from the published FP8 checkpoint must lose
    # its quantization_config here too.
    out_cfg = _plain_config(out_cfg, log)
    groups = ours_groups(stored, layout)
    out = Path(output_dir)
    total = sum(m.size.numel() * m.properties.dtype.itemsize for m in stored.values())
    progress = Progress("dcp2hf", len(groups), total, None, log)
    done, t0 = 0, time.monotonic()
    main_cache: dict[str, torch.Tensor] = {}  # embedding/head, read only for MTP groups, which copy them

    def get_main(key: str) -> torch.Tensor:
        if key not in main_cache:
            main_cache[key] = load([key])[key]
        return main_cache[key]

    def after_group(g: int | None, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal done
        done += sum(t.numel() * t.element_size() for t in tensors.values())
        main_cache.clear()
        progress.step(_label(g, layout), done)

    write_hf_checkpoint(out, out_cfg, layout, groups, load, get_main, max_shard_bytes, after_group)
    seconds = time.monotonic() - t0
    log(f"[dcp2hf] wrote {out}: {done / 2**20:.1f} MiB in {seconds:.1f}s ({done / 2**20 / max(seconds, 1e-9):.1f} MiB/s)")
    return {"bytes": done, "seconds": seconds, "index": str(out / INDEX_FILE)}


# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonmoe.dsv3.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf2dcp", help="HF safetensors (bf16/fp32/FP8) -> DCP weights-only checkpoint")
    a.add_argument("--input", required=True, help="HF checkpoint folder (config.json + safetensors)")
    a.add_argument("--output", required=True, help="DCP checkpoint folder to create")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="parameter dtype (buffers keep theirs)")
    a.add_argument("--ignore-mtp-copies", action="store_true",
                   help="drop MTP embed_tokens/shared_head.head even when they differ from the main tensors")
    a.add_argument("--overwrite", action="store_true", help="replace an existing different output")
    b = sub.add_parser("dcp2hf", help="DCP checkpoint ('model' entry) -> HF safetensors")
    b.add_argument("--input", required=True, help="DCP checkpoint folder")
    b.add_argument("--output", required=True, help="HF checkpoint folder to write")
    b.add_argument("--config", default=None, help="config.json (default: the one inside --input, which hf2dcp "
                                                   "output and training checkpoints hold)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    args = parser.parse_args(argv)
    try:
        if args.command == "hf2dcp":
            hf2dcp(args.input, args.output, DTYPES[args.dtype], args.ignore_mtp_copies, args.overwrite)
        else:
            dcp2hf(args.input, args.output, args.config, int(args.max_shard_gb * 2**30))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
