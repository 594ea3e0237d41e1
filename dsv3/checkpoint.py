"""Hugging Face safetensors checkpoints <-> tritonmoe state dicts: the one key mapping, FP8 dequantization,
a lazy reader and a sharded writer, and the model's ``from_pretrained`` / ``save_pretrained``.

In:  a checkpoint directory in the published DeepSeek-V3 layout (``config.json`` + ``model.safetensors`` or
     shards + ``model.safetensors.index.json``), bf16/fp32 or float8_e4m3fn with 128x128 block scales.
Out: our state dict (names in PLAN.md / DESIGN.md), and back.

The mapping, applied one HF decoder layer at a time so that the streaming converter (``convert.py``) never
holds more than one layer:

    model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight  [I,H] -> model.layers.{i}.mlp.experts.gate_up_proj
        [E,2I,H] (gate rows first), experts sorted by INTEGER id (a string sort puts 10 before 2)
    model.layers.{i}.mlp.experts.{e}.down_proj.weight       [H,I] -> model.layers.{i}.mlp.experts.down_proj
        [E,H,I]; transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj`` are accepted as they are
    model.layers.{L+k}.{enorm,hnorm,eh_proj}.weight               -> model.mtp.{k}.<same>   (L = num_hidden_layers)
    model.layers.{L+k}.shared_head.norm.weight                    -> model.mtp.{k}.norm.weight
    model.layers.{L+k}.shared_head.head.weight, .embed_tokens.weight: copies of lm_head / model.embed_tokens,
        which our model shares with MTP. On load they are checked equal to the main tensors (an error naming the
        key otherwise; ``ignore_mtp_copies=True`` drops them with a warning); on save copies are written so
        that the published layout is reproduced.
    model.layers.{L+k}.<rest>                                     -> model.mtp.{k}.layer.<rest>
    *rotary_emb* buffers                                          -> ignored
    every other key                                               -> same name

Group ids: the HF layer index (an int; MTP module k is L+k) or ``None`` for the tensors outside the decoder
layers (embedding, final norm, head). Both directions group by the same ids.

Shape letters: E routed experts, I expert intermediate size, H hidden size.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FP8_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"  # published FP8 checkpoints: <name>.weight_scale_inv beside <name>.weight
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_MTP_KEY = re.compile(r"^model\.mtp\.(\d+)\.(.+)$")
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")
_GLOBAL_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ------------------------------------------------------------------------------------------------------------
# Layout and key mapping
@dataclass(frozen=True)
class CheckpointLayout:
    """What the mapping needs to know about a model, read from its HF ``config.json``."""

    num_hidden_layers: int     # decoder layers of the main stack (L)
    num_mtp_layers: int        # MTP modules, stored by HF as layers L .. L+num_mtp_layers-1
    num_experts: int           # routed experts per MoE layer (E)
    tie_word_embeddings: bool  # lm_head is model.embed_tokens (no lm_head key of its own)

    @classmethod
    def from_hf_config(cls, cfg: Mapping) -> "CheckpointLayout":
        mtp = cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0
        return cls(int(cfg["num_hidden_layers"]), int(mtp), int(cfg.get("n_routed_experts") or 0),
                   bool(cfg.get("tie_word_embeddings", False)))

    def head_key(self) -> str:
        """Our tensor that plays the output head (the embedding when tied)."""
        return EMBED if self.tie_word_embeddings else HEAD


class Op(Enum):
    COPY = "copy"                    # one HF tensor, values unchanged
    STACK_GATE_UP = "stack_gate_up"  # sources: gate of experts 0..E-1, then up of experts 0..E-1 -> [E,2I,H]
    STACK_DOWN = "stack_down"        # sources: down of experts 0..E-1 -> [E,H,I]
    SHARED = "shared"                # an MTP copy of a main tensor: checked equal to `key`, never stored


@dataclass(frozen=True)
class MappedTensor:
    key: str                   # our state-dict name (for SHARED: the main-model tensor it must equal)
    op: Op
    sources: tuple[str, ...]   # HF names read to build it, in stacking order


@dataclass
class MappingPlan:
    tensors: list[MappedTensor]   # what the HF keys become
    ignored: list[str]            # rotary buffers
    unexpected: list[str]         # HF keys the layout has no place for
    missing: list[str]            # HF keys a partly present expert stack lacks


def hf_group_of(hf_key: str) -> int | None:
    """The HF layer index of a key, or None for keys outside the decoder layers."""
    m = _LAYER_KEY.match(hf_key)
    return int(m.group(1)) if m else None


def ours_group_of(key: str, layout: CheckpointLayout) -> int | None:
    """The HF layer index our key is stored in (MTP module k -> L+k), or None outside the decoder layers."""
    m = _LAYER_KEY.match(key)
    if m:
        return int(m.group(1))
    m = _MTP_KEY.match(key)
    return layout.num_hidden_layers + int(m.group(1)) if m else None


def plan_hf_keys(hf_keys: Iterable[str], layout: CheckpointLayout) -> MappingPlan:
    """Map a set of HF key names (any subset: one layer, or the whole checkpoint) to our tensors.

    Reads no data. Expert stacks must be complete within the given keys; a partial stack reports the absent
    experts' HF names in ``missing``, expert ids >= E land in ``unexpected``.
    """
    L, M, E = layout.num_hidden_layers, layout.num_mtp_layers, layout.num_experts
    plan = MappingPlan([], [], [], [])
    experts: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))  # prefix -> proj -> id
    for hf_key in hf_keys:
        if "rotary_emb" in hf_key:
            plan.ignored.append(hf_key)
            continue
        m = _LAYER_KEY.match(hf_key)
        if m is None:
            if hf_key == HEAD and layout.tie_word_embeddings:
                plan.tensors.append(MappedTensor(EMBED, Op.SHARED, (hf_key,)))
            elif hf_key in _GLOBAL_KEYS:
                plan.tensors.append(MappedTensor(hf_key, Op.COPY, (hf_key,)))
            else:
                plan.unexpected.append(hf_key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i < L:
            prefix = f"model.layers.{i}."
        elif i < L + M:
            k = i - L
            if rest in _MTP_OWN:
                plan.tensors.append(MappedTensor(f"model.mtp.{k}.{rest}", Op.COPY, (hf_key,)))
                continue
            if rest == "shared_head.norm.weight":
                plan.tensors.append(MappedTensor(f"model.mtp.{k}.norm.weight", Op.COPY, (hf_key,)))
                continue
            if rest in ("shared_head.head.weight", "embed_tokens.weight"):
                main = layout.head_key() if rest.startswith("shared_head") else EMBED
                plan.tensors.append(MappedTensor(main, Op.SHARED, (hf_key,)))
                continue
            prefix = f"model.mtp.{k}.layer."
        else:
            plan.unexpected.append(hf_key)
            continue
        e = _HF_EXPERT.match(rest)
        if e is None:
            plan.tensors.append(MappedTensor(prefix + rest, Op.COPY, (hf_key,)))
        elif int(e.group(1)) >= E:
            plan.unexpected.append(hf_key)
        else:
            experts[prefix][e.group(2)][int(e.group(1))] = hf_key
    for prefix, by_proj in experts.items():
        hf_prefix = _hf_prefix_of(prefix, layout)
        names = {p: [by_proj[p].get(x, f"{hf_prefix}mlp.experts.{x}.{p}.weight") for x in range(E)]
                 for p in ("gate_proj", "up_proj", "down_proj")}
        plan.missing += [n for p in names for x, n in enumerate(names[p]) if x not in by_proj[p]]
        if prefix + _FUSED_EXPERTS[0] in {t.key for t in plan.tensors}:
            plan.unexpected += [n for p in by_proj.values() for n in p.values()]  # fused AND per-expert
            continue
        plan.tensors.append(MappedTensor(prefix + _FUSED_EXPERTS[0], Op.STACK_GATE_UP,
                                         tuple(names["gate_proj"] + names["up_proj"])))
        plan.tensors.append(MappedTensor(prefix + _FUSED_EXPERTS[1], Op.STACK_DOWN, tuple(names["down_proj"])))
    return plan


def _hf_prefix_of(our_layer_prefix: str, layout: CheckpointLayout) -> str:
    m = re.match(r"^model\.mtp\.(\d+)\.layer\.$", our_layer_prefix)
    return f"model.layers.{layout.num_hidden_layers + int(m.group(1))}." if m else our_layer_prefix


def materialize(mapped: MappedTensor, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Build one of our tensors from the HF tensors `get(hf_name)` returns (already dequantized and cast)."""
    if mapped.op in (Op.COPY, Op.SHARED):
        return get(mapped.sources[0])
    if mapped.op is Op.STACK_DOWN:
        parts = [mapped.sources]
    else:
        half = len(mapped.sources) // 2
        parts = [mapped.sources[:half], mapped.sources[half:]]  # gate rows first, then up rows
    num_experts = len(parts[0])
    out, rows = None, 0
    for e in range(num_experts):
        col = 0
        for names in parts:
            w = get(names[e])
            if out is None:
                rows = w.shape[0]
                out = torch.empty(num_experts, rows * len(parts), w.shape[1], dtype=w.dtype, device=w.device)
            if w.shape != (rows, out.shape[2]):
                raise ValueError(f"{names[e]}: shape {tuple(w.shape)} differs from the other experts' "
                                 f"{(rows, out.shape[2])} (stacking into {mapped.key})")
            out[e, col:col + rows] = w
            col += rows
    return out


def iter_hf_to_ours(hf_keys: Iterable[str], get: Callable[[str], torch.Tensor], layout: CheckpointLayout,
                    ) -> Iterator[tuple[MappedTensor, torch.Tensor]]:
    """Given the key names of one HF layer (or any complete set), yield (mapping, our tensor) one at a time.

    SHARED entries are yielded too, so the caller can check them against the main tensors. Raises ValueError
    naming the keys when the set has keys the layout has no place for or an incomplete expert stack.
    """
    plan = plan_hf_keys(hf_keys, layout)
    problems = describe_key_problems(plan.missing, plan.unexpected)
    if problems:
        raise ValueError(f"checkpoint keys do not match the config: {problems}")
    for mapped in plan.tensors:
        yield mapped, materialize(mapped, get)


def ours_to_hf_name(key: str, layout: CheckpointLayout) -> str:
    """The HF name of one of our non-expert tensors (expert stacks expand in `iter_ours_to_hf`)."""
    m = _MTP_KEY.match(key)
    if m is None:
        return key
    base = f"model.layers.{layout.num_hidden_layers + int(m.group(1))}."
    rest = m.group(2)
    if rest in _MTP_OWN:
        return base + rest
    if rest == "norm.weight":
        return base + "shared_head.norm.weight"
    if rest.startswith("layer."):
        return base + rest[len("layer."):]
    raise ValueError(f"{key}: not a tensor of an MTP module (expected enorm/hnorm/eh_proj/norm/layer.*)")


def iter_ours_to_hf(tensors: Mapping[str, torch.Tensor], layout: CheckpointLayout,
                    get_main: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors (one group or all) -> (HF name, contiguous tensor) in the published per-expert layout.

    For every MTP module present, its copies of the embedding and output head are emitted from
    `get_main(our_key)`, so the published layout is reproduced byte for byte.
    """
    mtp_seen = set()
    for key, t in tensors.items():
        m = _MTP_KEY.match(key)
        if m:
            mtp_seen.add(int(m.group(1)))
        if key.endswith(_FUSED_EXPERTS[0]) or key.endswith(_FUSED_EXPERTS[1]):
            prefix = ours_to_hf_name(key, layout)[: -len("gate_up_proj" if "gate_up" in key else "down_proj")]
            if t.dim() != 3 or t.shape[0] != layout.num_experts:
                raise ValueError(f"{key}: expected [E={layout.num_experts}, ...] expert stack, got {tuple(t.shape)}")
            for e in range(t.shape[0]):
                if key.endswith(_FUSED_EXPERTS[0]):
                    inter = t.shape[1] // 2
                    yield f"{prefix}{e}.gate_proj.weight", t[e, :inter].contiguous()
                    yield f"{prefix}{e}.up_proj.weight", t[e, inter:].contiguous()
                else:
                    yield f"{prefix}{e}.down_proj.weight", t[e].contiguous()
        else:
            yield ours_to_hf_name(key, layout), t.contiguous()
    for k in sorted(mtp_seen):
        base = f"model.layers.{layout.num_hidden_layers + k}."
        yield base + "embed_tokens.weight", get_main(EMBED).contiguous()
        yield base + "shared_head.head.weight", get_main(layout.head_key()).contiguous()


def describe_key_problems(missing: Iterable[str], unexpected: Iterable[str], limit: int = 12) -> str:
    out = []
    for what, names in (("missing", sorted(missing, key=_natural)), ("unexpected", sorted(unexpected, key=_natural))):
        if names:
            shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
            out.append(f"{len(names)} {what} key(s): {shown}")
    return "; ".join(out)


def _natural(name: str):
    """Sort key treating digit runs as integers (layer 10 after layer 2)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def hf_names_for(key: str, layout: CheckpointLayout) -> str:
    """HF name(s) one of our keys comes from, for error messages."""
    if key.endswith(_FUSED_EXPERTS[0]) or key.endswith(_FUSED_EXPERTS[1]):
        base = ours_to_hf_name(key, layout).rsplit("mlp.experts.", 1)[0]
        projs = "{gate,up}_proj" if "gate_up" in key else "down_proj"
        return f"{base}mlp.experts.{{0..{layout.num_experts - 1}}}.{projs}.weight"
    return ours_to_hf_name(key, layout)


def check_against(plan_keys: Iterable[str], expected: Mapping[str, object], layout: CheckpointLayout,
                  plan: MappingPlan | None = None, skip_missing: Callable[[str], bool] | None = None) -> None:
    """Raise ValueError listing missing and unexpected keys (ours and their HF names) of a whole checkpoint."""
    plan_keys = set(plan_keys)
    missing = [f"{k} (HF {hf_names_for(k, layout)})" for k in expected if k not in plan_keys
               and not (skip_missing and skip_missing(k))]
    missing += plan.missing if plan else []
    unexpected = [k for k in plan_keys if k not in expected]
    unexpected += plan.unexpected if plan else []
    problems = describe_key_problems(missing, unexpected)
    if problems:
        raise ValueError(f"checkpoint does not match the model built from its config.json: {problems}")


# ------------------------------------------------------------------------------------------------------------
# FP8 block dequantization
def dequantize_fp8_blockwise(w_NK: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                             block: int = FP8_BLOCK, name: str = "weight") -> torch.Tensor:
    """w [N,K] float8_e4m3fn, scale_inv [ceil(N/block), ceil(K/block)] -> w * scale_inv per tile, in `dtype`.

    One row-block of tiles at a time, so the fp32 temporary is block x K, not N x K. Edge tiles (N or K not a
    multiple of block) use the same scale for their partial rows/columns.
    """
    if w_NK.dim() != 2:
        raise ValueError(f"{name}: FP8 block dequantization expects a 2-D weight, got {tuple(w_NK.shape)}")
    N, K = w_NK.shape
    want = (math.ceil(N / block), math.ceil(K / block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}{SCALE_SUFFIX}: shape {tuple(scale_inv.shape)}, expected {want} for a "
                         f"[{N},{K}] weight in {block}x{block} blocks")
    out = torch.empty(N, K, dtype=dtype, device=w_NK.device)
    scale = scale_inv.float()
    for b in range(want[0]):
        r0, r1 = b * block, min((b + 1) * block, N)
        scale_row_K = scale[b].repeat_interleave(block)[:K]
        out[r0:r1] = (w_NK[r0:r1].float() * scale_row_K).to(dtype)
    return out


# ------------------------------------------------------------------------------------------------------------
# Reading
def _refuse_pickles(path: Path) -> None:
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    raise ValueError(
        f"{path} holds no safetensors checkpoint ({SINGLE_FILE} or {INDEX_FILE})"
        + (f"; found pickle files {pickles[:4]}: they are refused because unpickling can execute arbitrary "
           "code. Convert them to safetensors in a sandbox you trust first" if pickles else ""))


_SAFETENSORS_BYTES = {"F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4,
                      "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class SafetensorsCheckpoint:
    """Lazy reader of an HF safetensors checkpoint directory: only index and headers are read up front.

    ``keys()`` lists logical tensor names (FP8 scale keys folded into their weights; zero-element tensors, which
    carry no values, listed in ``empty`` instead); ``get(name, dtype)``
    reads one tensor, dequantizing FP8 block-wise. ``release()`` drops open shards (their memory maps), which
    a streaming caller does after each layer.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"checkpoint directory {self.path} does not exist")
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            bad = sorted({f for f in weight_map.values() if not f.endswith(".safetensors")})
            if bad:
                raise ValueError(f"{index} points at non-safetensors files {bad[:4]}: refused (only safetensors "
                                 "are read; pickled weights can execute arbitrary code when loaded)")
            for f in sorted(set(weight_map.values())):
                if not (self.path / f).is_file():
                    key = next(k for k, v in weight_map.items() if v == f)
                    raise ValueError(f"shard {f} listed in {INDEX_FILE} (holding {key} among others) is missing "
                                     f"from {self.path}")
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            _refuse_pickles(self.path)
        self.weight_map: dict[str, str] = weight_map
        self.scales = {k[: -len(SCALE_SUFFIX)]: k for k in weight_map if k.endswith(SCALE_SUFFIX)}
        self._keys = [k for k in weight_map if not k.endswith(SCALE_SUFFIX)]
        orphans = sorted(set(self.scales) - set(self._keys))
        if orphans:
            raise ValueError(f"scale keys without their weight: {[self.scales[k] for k in orphans][:8]}")
        self._handles: dict[str, object] = {}
        # Zero-element tensors hold no values: transformers saves a 0-wide shared-expert MLP when n_shared_experts
        # is 0, which our model (rightly) has no place for. Skipped here, from the headers alone.
        self.empty = [k for k in self._keys if math.prod(self._handle(weight_map[k]).get_slice(k).get_shape()) == 0]
        if self.empty:
            empty = set(self.empty)
            self._keys = [k for k in self._keys if k not in empty]
        self.release()

    def keys(self) -> list[str]:
        return list(self._keys)

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def config(self) -> dict:
        cfg = self.path / CONFIG_FILE
        if not cfg.is_file():
            raise ValueError(f"{self.path} has no {CONFIG_FILE}: shapes come from the checkpoint's own config")
        return json.loads(cfg.read_text())

    def _handle(self, fname: str):
        handle = self._handles.get(fname)
        if handle is None:
            handle = self._handles[fname] = self._safe_open(self.path / fname, "pt")
        return handle

    def _raw(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise ValueError(f"{key}: not in checkpoint {self.path}")
        fname = self.weight_map[key]
        try:
            t = self._handle(fname).get_tensor(key)
        except Exception as e:  # safetensors raises its own error types; name the key and shard
            raise ValueError(f"{key}: cannot read it from {fname}: {e}") from e
        return t

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One logical tensor; FP8 weights are dequantized to `dtype` (bf16 if None), others cast to `dtype`."""
        t = self._raw(key)
        if t.dtype == torch.float8_e4m3fn:
            if key not in self.scales:
                raise ValueError(f"{key} is stored as float8_e4m3fn but {key}{SCALE_SUFFIX} is absent: refusing "
                                 "to pass quantized values through without their block scales")
            return dequantize_fp8_blockwise(t, self._raw(self.scales[key]), dtype or torch.bfloat16, name=key)
        if key in self.scales:
            raise ValueError(f"{key} has a {SCALE_SUFFIX} but is stored as {t.dtype}, not float8_e4m3fn")
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)

    def nbytes(self, key: str) -> int:
        """Stored bytes of a logical tensor and its scale, from the safetensors headers (no data is read)."""
        total = 0
        for name in (key, self.scales.get(key)):
            if name is not None:
                sl = self._handle(self.weight_map[name]).get_slice(name)
                total += math.prod(sl.get_shape()) * _SAFETENSORS_BYTES[sl.get_dtype()]
        return total

    def release(self) -> None:
        self._handles.clear()

    def groups(self) -> dict[int | None, list[str]]:
        """Logical keys by group id (HF layer index, None for the rest), globals first, layers ascending."""
        by_group: dict[int | None, list[str]] = defaultdict(list)
        for k in self._keys:
            by_group[hf_group_of(k)].append(k)
        return dict(sorted(by_group.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


# ------------------------------------------------------------------------------------------------------------
# Writing
class ShardedSafetensorsWriter:
    """Writes HF tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of about `max_shard_bytes` plus
    ``model.safetensors.index.json``; holds at most one shard's tensors. Shards are written under temporary
    names and renamed once their count is known (``finish``)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_storages: set[int] = set()
        self._shards: list[list[str]] = []
        self._written: set[str] = set()  # every key added (pending or flushed): the duplicate check in O(1)
        self.total_bytes = 0

    def add(self, hf_key: str, t: torch.Tensor) -> None:
        if hf_key in self._written:
            raise ValueError(f"{hf_key}: written twice")
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (an expert slice of a stack, an MTP copy of the
        # embedding): give every written tensor storage of its own.
        if t.untyped_storage().nbytes() != nbytes or t.untyped_storage().data_ptr() in self._pending_storages:
            t = t.clone()
        self._pending_storages.add(t.untyped_storage().data_ptr())
        self._pending[hf_key] = t
        self._written.add(hf_key)
        self._pending_bytes += nbytes

    def flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        save_file(self._pending, self.out_dir / f".shard-{len(self._shards):05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes, self._pending_storages = {}, 0, set()

    def finish(self) -> dict[str, str]:
        self.flush()
        n = len(self._shards)
        weight_map = {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f".shard-{i:05d}.tmp", self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural(kv[0])))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


# ------------------------------------------------------------------------------------------------------------
# The model's from_pretrained / save_pretrained
MISSING_MTP_POLICIES = ("drop", "init", "error")


def mtp_layers_present(keys: Iterable[str], layout: CheckpointLayout) -> bool:
    return any((g := hf_group_of(k)) is not None and g >= layout.num_hidden_layers for k in keys)


def _is_mtp_key(key: str) -> bool:
    return key.startswith("model.mtp.")


def from_pretrained(cls, hf_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, missing_mtp: str = "drop",
                    ignore_mtp_copies: bool = False):
    """Build `cls` (DeepseekV3ForCausalLM) from an HF safetensors checkpoint directory.

    dtype: parameters' dtype (None: as stored; FP8 weights dequantize to bf16). Buffers keep the dtype the
    model gives them (``e_score_correction_bias`` stays fp32). device: where the model is built and loaded.
    missing_mtp: what to do when config.json asks for MTP modules but the checkpoint holds none (transformers'
    own ``save_pretrained`` drops them): "drop" builds the model without MTP (warning), "init" keeps randomly
    initialized MTP modules (to train them from scratch), "error" refuses.
    ignore_mtp_copies: drop the MTP layers' embed_tokens / shared_head.head copies even when they differ from
    the main tensors (warning) instead of raising.
    Raises ValueError naming missing, unexpected and mis-shaped keys.
    """
    from .config import DeepseekV3Config

    if missing_mtp not in MISSING_MTP_POLICIES:
        raise ValueError(f"missing_mtp must be one of {MISSING_MTP_POLICIES}, got {missing_mtp!r}")
    ckpt = SafetensorsCheckpoint(hf_dir)
    hf_cfg = ckpt.config()
    layout = CheckpointLayout.from_hf_config(hf_cfg)
    skip_missing = None
    if layout.num_mtp_layers and not mtp_layers_present(ckpt.keys(), layout):
        if missing_mtp == "error":
            raise ValueError(f"{hf_dir}: config.json has num_nextn_predict_layers={layout.num_mtp_layers} but the "
                             f"checkpoint holds no layer >= num_hidden_layers={layout.num_hidden_layers}")
        if missing_mtp == "drop":
            warnings.warn(f"{hf_dir}: no MTP layers in the checkpoint although config.json asks for "
                          f"{layout.num_mtp_layers}; building the model without MTP (missing_mtp='init' keeps "
                          "randomly initialized MTP modules instead)")
            hf_cfg = {**hf_cfg, "num_nextn_predict_layers": 0}
            layout = CheckpointLayout.from_hf_config(hf_cfg)
        else:
            skip_missing = _is_mtp_key
    cfg = DeepseekV3Config.from_hf(hf_cfg)
    device = torch.device(device) if device is not None else torch.device("cpu")
    # Built on the meta device: no memory and no random init for weights the checkpoint overwrites (at 671B the
    # init alone is 1.3 TB of normal_ in bf16). The loaded tensors are assigned in place of the meta ones below.
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()

    plan = plan_hf_keys(ckpt.keys(), layout)
    check_against([t.key for t in plan.tensors if t.op is not Op.SHARED], expected, layout, plan, skip_missing)

    buffers = {name for name, _ in model.named_buffers()}
    state: dict[str, torch.Tensor] = {}
    shared: list[tuple[MappedTensor, torch.Tensor]] = []
    for mapped in plan.tensors:
        t = load_mapped(ckpt, mapped, expected[mapped.key], mapped.key in buffers, dtype)
        if mapped.op is Op.SHARED:
            shared.append((mapped, t))
        else:
            state[mapped.key] = t.to(device)
    ckpt.release()
    for mapped, t in shared:
        _check_shared_copy(mapped, t, state[mapped.key], ignore_mtp_copies)
    if skip_missing:  # missing_mtp="init": only the MTP modules are initialized, then cast to the requested dtype
        from .init import init_weights_

        for mtp in model.model.mtp:
            mtp.to_empty(device=device)
            init_weights_(mtp, cfg.initializer_range)
        state.update({k: v if k in buffers or dtype is None or not v.is_floating_point() else v.to(dtype)
                      for k, v in model.state_dict().items() if skip_missing(k)})
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_meta_buffers(model, device)
    return model


def load_mapped(ckpt: SafetensorsCheckpoint, mapped: MappedTensor, want: torch.Tensor, is_buffer: bool,
                dtype: torch.dtype | None) -> torch.Tensor:
    """Read and build one of our tensors for the model tensor `want` (a meta tensor of the model built from
    config.json): buffers and non-float tensors in `want`'s dtype, parameters in `dtype` (None: as stored, FP8 to
    bf16). Raises ValueError naming the HF source(s) when the shape differs from `want`'s."""
    target_dtype = want.dtype if is_buffer or not want.is_floating_point() else dtype
    t = materialize(mapped, lambda k: ckpt.get(k, target_dtype))
    if tuple(t.shape) != tuple(want.shape):
        raise ValueError(f"{', '.join(mapped.sources[:2])}: shape {tuple(t.shape)} does not match "
                         f"{mapped.key} {tuple(want.shape)} of the model built from config.json")
    return t


def _materialize_meta_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are in no checkpoint: after a meta-device build they are still meta. The only ones
    the model has are the routers' token counters, which start at zero (rope tables are plain CPU attributes)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                assert name in module._non_persistent_buffers_set, f"persistent buffer {name} was not loaded"
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left[:4]}"


def _check_shared_copy(mapped: MappedTensor, copy: torch.Tensor, main: torch.Tensor, ignore: bool) -> None:
    if copy.shape == main.shape and torch.equal(copy.to(main.dtype), main):
        return
    msg = (f"{mapped.sources[0]} differs from {mapped.key}, which our model shares with the MTP module (the "
           "published DeepSeek-V3 stores identical copies)")
    if not ignore:
        raise ValueError(msg + "; pass ignore_mtp_copies=True (--ignore-mtp-copies) to drop the copy and use the "
                               "main tensor")
    warnings.warn(msg + "; dropped, the main tensor is used")


def _model_hf_config(model) -> dict:
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_hf"):
        raise ValueError(f"save_pretrained: {type(model).__name__} has no DeepseekV3Config at .config/.cfg")
    return cfg.to_hf()


def save_pretrained(model, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as an HF checkpoint: config.json + sharded safetensors + index, published per-expert layout
    (MTP modules as layers L+k with their embed/head copies), loadable by transformers'
    ``DeepseekV3ForCausalLM.from_pretrained``. The directory is written under a temporary name and renamed,
    so an interrupted save leaves no half checkpoint. Sharded (DTensor) models: save with DCP and use
    ``python -m tritonmoe.dsv3.convert dcp2hf``.
    """
    from torch.distributed.tensor import DTensor

    hf_cfg = _model_hf_config(model)
    layout = CheckpointLayout.from_hf_config(hf_cfg)
    state = model.state_dict()
    sharded = [k for k, v in state.items() if isinstance(v, DTensor)]
    if sharded:
        raise ValueError(f"save_pretrained needs plain tensors, but {sharded[0]} is a DTensor (FSDP/EP model): save "
                         "it with DCP and convert with `python -m tritonmoe.dsv3.convert dcp2hf`")
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
    write_hf_checkpoint(out_dir, hf_cfg, layout, ours_groups(state, layout), lambda keys: {k: state[k] for k in keys},
                        state.__getitem__, max_shard_bytes)


def ours_groups(keys: Iterable[str], layout: CheckpointLayout) -> dict[int | None, list[str]]:
    """Our keys by group id (``ours_group_of``) in writing order: globals first, then HF layers ascending."""
    by_group: dict[int | None, list[str]] = defaultdict(list)
    for k in keys:
        by_group[ours_group_of(k, layout)].append(k)
    return dict(sorted(by_group.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def write_hf_checkpoint(out_dir: str | os.PathLike, hf_cfg: Mapping, layout: CheckpointLayout,
                        groups: Mapping[int | None, list[str]],
                        load: Callable[[list[str]], Mapping[str, torch.Tensor]],
                        get_main: Callable[[str], torch.Tensor], max_shard_bytes: int,
                        after_group: Callable[[int | None, Mapping[str, torch.Tensor]], None] | None = None) -> None:
    """The HF writing loop of ``save_pretrained`` and ``convert dcp2hf``: for each group of our keys (``ours_groups``)
    `load(keys)` gives our tensors, written in the published per-expert layout (``iter_ours_to_hf``, MTP copies
    from `get_main`) into sharded safetensors under ``<out_dir>.partial``; `after_group(group, tensors)` runs
    after each group is written. Then `hf_cfg` goes to config.json and the result is published into `out_dir`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
    for g, keys in groups.items():
        tensors = load(keys)
        for hf_key, t in iter_ours_to_hf(tensors, layout, get_main):
            writer.add(hf_key, t)
        if after_group is not None:
            after_group(g, tensors)
        del tensors
    writer.finish()
    (tmp / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    publish(tmp, out_dir)


def publish(tmp: Path, out_dir: Path) -> None:
    """Move a finished HF checkpoint from `tmp` into `out_dir`, replacing only a previous checkpoint's files
    there (config.json, weight shards, index); other files in `out_dir` are left alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.name in (CONFIG_FILE, INDEX_FILE, SINGLE_FILE) or re.fullmatch(r"model-\d+-of-\d+\.safetensors",
                                                                           old.name):
            old.unlink()
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    tmp.rmdir()
