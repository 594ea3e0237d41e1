"""Loading and conversion defects of issue 10 (items 1, 7-10, 13, 14, the fp32 routers, durability), one test per
defect, each failing on the code before the fix (f79bc4a): mixed-dtype checkpoints, content-aware resume, what
--overwrite may replace, shard paths leaving the folder, one-line errors for corrupt inputs, fsync before every
rename, planted DCP metadata, checksums on converted checkpoints.

Synthetic checkpoints only (builders shared with test_checkpoint.py and test_convert.py).
"""

import json
import math
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from test_checkpoint import (TINY, _read_all, _transformers_model, hf_mtp, hf_tiny, make_hf_checkpoint,  # noqa: F401
                             quantize_fp8_blockwise)
from test_convert import hf_bf16, interrupt_hf2dcp_after  # noqa: F401
from tritonmoe.dsv3 import convert
from tritonmoe.dsv3 import safetensors_io as sio
from tritonmoe.parallel import CheckpointError
from tritonmoe.parallel.checkpoint import load_dcp, read_dcp_metadata

transformers = pytest.importorskip("transformers")


def _quiet(_msg):
    pass


def _dcp_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the "model" entry of a DCP checkpoint, through the allow-list reader."""
    md = read_dcp_metadata(path)
    sd = {fqn.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
          for fqn, m in md.state_dict_metadata.items() if fqn.startswith("model.")}
    with warnings.catch_warnings():  # DCP warns that there is no process group: single-process on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp({"model": sd}, path, no_dist=True)
    return sd


def _cli(capsys, *argv) -> tuple[int, str]:
    """convert.main as a user runs it: (exit code, stderr)."""
    code = convert.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line_error(capsys, *argv) -> str:
    code, err = _cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if not ln.startswith("[")]  # progress lines start with [hf2dcp]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------------------
# 7: one dtype for a mixed-dtype checkpoint; fp32 routers through conversion and loading
def _mixed_dtype_checkpoint(tmp_path: Path, hf_tiny, config_dtype: str | None) -> Path:
    path, _ = hf_tiny
    tensors = {k: v if "norm" in k or k.endswith(("mlp.gate.weight", "e_score_correction_bias")) else v.bfloat16()
               for k, v in _read_all(path).items()}
    config = json.loads((path / sio.CONFIG_FILE).read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    if config_dtype is not None:
        config["torch_dtype"] = config_dtype
    return make_hf_checkpoint(tmp_path / f"mixed_{config_dtype}", tensors, config)


# Cases: no dtype in config.json (the majority of stored elements, bf16, wins); the config's torch_dtype wins.
@pytest.mark.parametrize("config_dtype, want", [(None, torch.bfloat16), ("float32", torch.float32)])
def test_mixed_dtype_checkpoint_loads_into_one_dtype(tmp_path, hf_tiny, config_dtype, want):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    path = _mixed_dtype_checkpoint(tmp_path, hf_tiny, config_dtype)
    with pytest.warns(UserWarning, match="no MTP layers"):
        model = DeepseekV3ForCausalLM.from_pretrained(path)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    routers = {n for n in dtypes if n.endswith("mlp.gate.weight")}
    assert routers and all(dtypes[n] == torch.float32 for n in routers)
    assert {dtypes[n] for n in dtypes if n not in routers} == {want}, dtypes
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        logits = model(ids).logits  # mixed bf16/fp32 parameters made this raise (m1 and m2 dtypes)
    assert logits.dtype == want and torch.isfinite(logits).all()


def test_transformers_bf16_checkpoint_round_trip_is_bit_exact_with_fp32_routers(tmp_path):
    """A checkpoint transformers itself writes in bf16 stores its routers (mlp.gate.weight) and biases in fp32:
    HF -> DCP (--dtype bf16) -> HF gives every tensor back in its dtype, bit for bit."""
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    _transformers_model().save_pretrained(tmp_path / "fp32")
    tf_bf16 = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    tf_bf16.save_pretrained(tmp_path / "src")
    src = _read_all(tmp_path / "src")
    assert src["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # what transformers writes
    assert src["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.bfloat16
    convert.hf2dcp(tmp_path / "src", tmp_path / "dcp", torch.bfloat16, log=_quiet)
    assert _dcp_tensors(tmp_path / "dcp")["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    convert.dcp2hf(tmp_path / "dcp", tmp_path / "back", log=_quiet)
    back = _read_all(tmp_path / "back")
    assert back.keys() == src.keys()
    for k in src:
        assert back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]), k
    with pytest.warns(UserWarning, match="no MTP layers"):
        ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    assert ours.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert torch.equal(ours.model.layers[1].mlp.gate.weight, src["model.layers.1.mlp.gate.weight"])


# ------------------------------------------------------------------------------------------------------------
# 8: resume trusts what was read, not (size, mtime)
def _rewrite_same_size_and_mtime(hf_dir: Path, key: str) -> torch.Tensor:
    """Rewrite the shard holding `key` with that tensor's values changed: same names, shapes, dtypes (so the same
    header and size) and the same mtime. Returns the new value."""
    shard = hf_dir / json.loads((hf_dir / sio.INDEX_FILE).read_text())["weight_map"][key]
    st = shard.stat()
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = tensors[key] * 2 + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    return tensors[key]


def test_resume_redoes_layers_whose_source_bytes_changed(tmp_path, hf_bf16, monkeypatch):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_bf16, src)
    interrupt_hf2dcp_after(2, src, tmp_path / "dcp", monkeypatch)  # globals and layer 0 are finished
    key = "model.layers.0.input_layernorm.weight"
    new = _rewrite_same_size_and_mtime(src, key)
    lines = []
    convert.hf2dcp(src, tmp_path / "dcp", log=lines.append)
    assert any("layer 0" in ln and "changed" in ln for ln in lines), lines
    assert sum("(done before)" in ln for ln in lines) == 1, lines  # the globals are still good
    got = _dcp_tensors(tmp_path / "dcp")
    assert torch.equal(got[key], new.bfloat16())

    # A finished conversion is no longer "nothing to do" once its source changed the same way.
    new = _rewrite_same_size_and_mtime(src, "model.norm.weight")
    with pytest.raises(ValueError, match=r"earlier state.*model\.norm\.weight.*--overwrite"):
        convert.hf2dcp(src, tmp_path / "dcp", log=_quiet)
    convert.hf2dcp(src, tmp_path / "dcp", overwrite=True, log=_quiet)
    assert torch.equal(_dcp_tensors(tmp_path / "dcp")["model.norm.weight"], new.bfloat16())
    again = []
    convert.hf2dcp(src, tmp_path / "dcp", log=again.append)
    assert "nothing to do" in again[-1]


# ------------------------------------------------------------------------------------------------------------
# 9: what an output folder may hold
def test_output_folder_empty_accepted_foreign_files_refused_and_kept(tmp_path, hf_bf16, capsys):
    out = tmp_path / "out"
    out.mkdir()  # `mkdir out && convert ... --output out`
    assert _cli(capsys, "hf2dcp", "--input", hf_bf16, "--output", out)[0] == 0
    first = _dcp_tensors(out)

    (out / "notes.txt").write_text("mine")
    err = _one_line_error(capsys, "hf2dcp", "--input", hf_bf16, "--output", out, "--dtype", "fp32", "--overwrite")
    assert "notes.txt" in err and "no conversion wrote" in err
    assert (out / "notes.txt").read_text() == "mine" and (out / ".metadata").is_file()
    (out / "notes.txt").unlink()

    # --overwrite replaces a previous conversion (and only that), once the new one is complete.
    assert _cli(capsys, "hf2dcp", "--input", hf_bf16, "--output", out, "--dtype", "fp32", "--overwrite")[0] == 0
    second = _dcp_tensors(out)
    key = "model.layers.1.self_attn.q_b_proj.weight"
    assert first[key].dtype == torch.bfloat16 and second[key].dtype == torch.float32
    assert json.loads((out / convert.INFO_FILE).read_text())["dtype"] == "float32"

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    err = _one_line_error(capsys, "hf2dcp", "--input", hf_bf16, "--output", other, "--overwrite")
    assert "data.bin" in err and (other / "data.bin").read_bytes() == b"x"


# ------------------------------------------------------------------------------------------------------------
# 10: shard paths that leave the folder
# Cases: a relative path climbing out of the folder; an absolute path.
@pytest.mark.parametrize("relative", [True, False])
def test_index_paths_outside_the_folder_are_refused(tmp_path, hf_mtp, capsys, relative):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    path, _ = hf_mtp
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", _read_all(path), json.loads((path / sio.CONFIG_FILE).read_text()))
    (tmp_path / "elsewhere").mkdir()
    name = "model-00002-of-00003.safetensors"
    os.replace(ckpt / name, tmp_path / "elsewhere" / name)
    outside = f"../elsewhere/{name}" if relative else str(tmp_path / "elsewhere" / name)
    index = json.loads((ckpt / sio.INDEX_FILE).read_text())
    index["weight_map"] = {k: outside if v == name else v for k, v in index["weight_map"].items()}
    (ckpt / sio.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="leaves the checkpoint folder"):
        DeepseekV3ForCausalLM.from_pretrained(ckpt)
    err = _one_line_error(capsys, "hf2dcp", "--input", ckpt, "--output", tmp_path / "dcp")
    assert outside in err and "leaves the checkpoint folder" in err
    assert not (tmp_path / "dcp").exists()


# ------------------------------------------------------------------------------------------------------------
# 13: every user-facing failure is one line naming the file, exit code 2
def _corrupt(kind: str, good: bytes) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    if kind == "random":
        return os.urandom(len(good))
    if kind == "header_length_2^63":
        return struct.pack("<Q", 2**63) + good[8:]
    if kind == "truncated":
        return good[: len(good) // 2]
    header = json.loads(good[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**6  # past the end of the file
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + good[8 + n:]


@pytest.mark.parametrize("kind", ["random", "header_length_2^63", "truncated", "offsets_past_end"])
def test_corrupt_safetensors_is_one_line_naming_the_file(tmp_path, hf_mtp, capsys, kind):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    path, _ = hf_mtp
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", _read_all(path), json.loads((path / sio.CONFIG_FILE).read_text()))
    shard = ckpt / "model-00002-of-00003.safetensors"
    shard.write_bytes(_corrupt(kind, shard.read_bytes()))
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors"):
        DeepseekV3ForCausalLM.from_pretrained(ckpt)
    err = _one_line_error(capsys, "hf2dcp", "--input", ckpt, "--output", tmp_path / "dcp")
    assert "model-00002-of-00003.safetensors" in err


# Cases: an index that is not JSON, a JSON list, a weight_map that is a list; a config that is not JSON, one
# without num_hidden_layers, one with a non-integer layer count.
@pytest.mark.parametrize("file, text, expect", [
    (sio.INDEX_FILE, "{not json", "not JSON"),
    (sio.INDEX_FILE, "[1, 2]", "weight_map"),
    (sio.INDEX_FILE, '{"weight_map": ["a"]}', "weight_map"),
    (sio.CONFIG_FILE, "{oops", "not JSON"),
    (sio.CONFIG_FILE, None, "num_hidden_layers is missing"),
    (sio.CONFIG_FILE, "layers: 2.5", "num_hidden_layers"),
])
def test_bad_index_and_config_are_one_line_naming_the_file(tmp_path, hf_mtp, capsys, file, text, expect):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    path, _ = hf_mtp
    config = json.loads((path / sio.CONFIG_FILE).read_text())
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", _read_all(path), config)
    if text is None:
        text = json.dumps({k: v for k, v in config.items() if k != "num_hidden_layers"})
    elif text.startswith("layers:"):
        text = json.dumps({**config, "num_hidden_layers": 2.5})
    (ckpt / file).write_text(text)
    with pytest.raises(ValueError, match=expect) as e:
        DeepseekV3ForCausalLM.from_pretrained(ckpt)
    assert file in str(e.value)
    err = _one_line_error(capsys, "hf2dcp", "--input", ckpt, "--output", tmp_path / "dcp")
    assert file in err and expect in err


class _Planted:
    """Unpickling this runs os.mkdir(path): what a planted .metadata could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


# Cases: random bytes, a truncated pickle, a pickle that runs code when loaded (issue 10 item 1), a .distcp data
# file cut short (named through checksums.json), the same without checksums.json (named by the group's files).
@pytest.mark.parametrize("damage", ["metadata_random", "metadata_truncated", "metadata_planted", "distcp_truncated",
                                    "distcp_truncated_no_checksums"])
def test_damaged_dcp_input_is_one_line_naming_the_file(tmp_path, hf_bf16, capsys, damage):
    dcp_dir = tmp_path / "dcp"
    convert.hf2dcp(hf_bf16, dcp_dir, log=_quiet)
    marker = tmp_path / "code_ran"
    if damage.startswith("metadata"):
        target, good = dcp_dir / ".metadata", (dcp_dir / ".metadata").read_bytes()
        bad = {"metadata_random": os.urandom(len(good)), "metadata_truncated": good[: len(good) // 2],
               "metadata_planted": pickle.dumps(_Planted(str(marker)))}[damage]
        name = ".metadata"
    else:
        target = next((dcp_dir / convert.PARTS_DIR / "00001").glob("*.distcp"))
        bad = target.read_bytes()[:100]
        name = target.name
        if damage.endswith("no_checksums"):
            (dcp_dir / "checksums.json").unlink(missing_ok=True)
    target.write_bytes(bad)
    err = _one_line_error(capsys, "dcp2hf", "--input", dcp_dir, "--output", tmp_path / "hf")
    assert name in err, err
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_max_shard_gb_must_be_positive(tmp_path, hf_bf16, capsys):
    convert.hf2dcp(hf_bf16, tmp_path / "dcp", log=_quiet)
    for bad in ("-1", "0", "nan"):
        err = _one_line_error(capsys, "dcp2hf", "--input", tmp_path / "dcp", "--output", tmp_path / "hf",
                              "--max-shard-gb", bad)
        assert "--max-shard-gb" in err
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------------------
# Durability: every file and folder fsynced before it is renamed into place
def _record_fsyncs_and_moves(monkeypatch) -> list[tuple]:
    events: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b, *args, **kwargs):
        events.append(("move", os.path.abspath(a), os.path.abspath(b)))
        return real_replace(a, b, *args, **kwargs)

    def rename(a, b, *args, **kwargs):
        events.append(("move", os.path.abspath(a), os.path.abspath(b)))
        return real_rename(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _assert_durable(events: list[tuple], out: Path) -> None:
    """Every file and folder now under `out` was fsynced under the name it was written with, before the first
    move that carried it (its own or a parent folder's); and out's parent was fsynced after the last move."""
    out = out.resolve()
    paths = [out] + sorted(p.resolve() for p in out.rglob("*"))
    moves = [i for i, e in enumerate(events) if e[0] == "move"]
    assert moves, "nothing was renamed into place"
    for p in paths:
        name, first_move = str(p), None
        for i in reversed(moves):  # follow the path back to the name it was written under
            _, a, b = events[i]
            if name == b or name.startswith(b + os.sep):
                name, first_move = a + name[len(b):], i
        if first_move is None:
            continue  # written in place (a folder made by publishing)
        assert ("fsync", name) in events[:first_move], f"{p} (written as {name}) was not fsynced before its rename"
    assert ("fsync", str(out.parent)) in events[moves[-1]:], f"{out.parent} not fsynced after the rename"


def test_saves_fsync_files_and_folders_before_renaming(tmp_path, hf_bf16, monkeypatch):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    events = _record_fsyncs_and_moves(monkeypatch)
    convert.hf2dcp(hf_bf16, tmp_path / "dcp", log=_quiet)
    _assert_durable(events, tmp_path / "dcp")
    events.clear()
    convert.dcp2hf(tmp_path / "dcp", tmp_path / "hf", log=_quiet)
    _assert_durable(events, tmp_path / "hf")
    model = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf")
    events.clear()
    model.save_pretrained(tmp_path / "saved")
    _assert_durable(events, tmp_path / "saved")


# ------------------------------------------------------------------------------------------------------------
# Checksums on converted checkpoints; FP8 against torch's own dequantizing reader
def test_converted_checkpoint_is_verified_on_load(tmp_path, hf_bf16):
    from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
    from tritonmoe.parallel import load_model_weights

    convert.hf2dcp(hf_bf16, tmp_path / "dcp", log=_quiet)
    record = json.loads((tmp_path / "dcp" / "checksums.json").read_text())
    assert record["algorithm"] == "crc32" and ".metadata" in record["files"]
    data = next((tmp_path / "dcp" / convert.PARTS_DIR / "00002").glob("*.distcp"))
    assert data.relative_to(tmp_path / "dcp").as_posix() in record["files"]
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf(tmp_path / "dcp" / sio.CONFIG_FILE))
    load_model_weights(model, tmp_path / "dcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # one flipped bit inside a tensor's bytes
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=data.name):
        load_model_weights(model, tmp_path / "dcp")


def test_fp8_dequantization_bit_identical_to_torch_reader(tmp_path):
    """The reason to keep our dequantization (safetensors_io docstring) is speed; its values must be torch's."""
    import torch.distributed.checkpoint as dcp

    quantized = pytest.importorskip("torch.distributed.checkpoint.quantized_hf_storage")
    w = torch.randn(300, 200) * 3  # edge tiles on both dims
    q, s = quantize_fp8_blockwise(w)
    save_file({"w.weight": q, "w.weight_scale_inv": s}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / sio.INDEX_FILE).write_text(json.dumps({"weight_map": dict.fromkeys(
        ["w.weight", "w.weight_scale_inv"], "model-00001-of-00001.safetensors")}))
    for dtype in (torch.float32, torch.bfloat16):
        theirs = {"w.weight": torch.empty(300, 200, dtype=dtype)}
        dcp.load(theirs, storage_reader=quantized.QuantizedHuggingFaceStorageReader(str(tmp_path), target_dtype=dtype),
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        ours = sio.dequantize_fp8_blockwise(q, s, dtype)
        assert torch.equal(ours, theirs["w.weight"]), dtype
        assert math.isfinite(ours.float().abs().max().item())
