"""Issue 10's defects on the training side, one section each (the numbers are the issue's): each test failed on the
code before its fix. The converter's and the checkpoint reader's cases are in tests/test_convert*.py and
tests/test_checkpoint.py.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed

COMMON = ["--batch-size", "4", "--seq-len", "16", "--val-every", "0", "--log-every", "100", "--seed", "3"]
ENV = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")


def _main(argv, on_step=None):
    from tritonmoe.dsv3.train import main

    return main(argv, on_step=on_step)


def _cli(args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "tritonmoe.dsv3.train", *args], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


class _Plant:
    """Unpickling this creates `path`: what a planted pickle in a downloaded checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------- 1. code execution from a folder
def _planted(root: str) -> dict:
    import torch.distributed.checkpoint as dcp

    from tritonmoe.parallel import CheckpointError, load_model_weights, read_train_state
    from tritonmoe.parallel.checkpoint import read_dcp_metadata

    root = Path(root)
    run = root / "run"
    _main(COMMON + ["--steps", "1", "--out", str(run)])
    ckpt = run / "step_00000001"
    errors = {}

    # a) .metadata replaced by a pickle that runs code: every reader of the folder refuses, naming the file.
    bad_md = root / "bad_md"
    import shutil
    shutil.copytree(ckpt, bad_md)
    (bad_md / ".metadata").write_bytes(pickle.dumps(_Plant(root / "pwned_md")))
    (bad_md / "checksums.json").unlink()  # not caught as corruption first: the unpickler must refuse by itself
    for name, call in (("read_dcp_metadata", lambda: read_dcp_metadata(bad_md)),
                       ("read_train_state", lambda: read_train_state(bad_md)),
                       ("load_model_weights", lambda: load_model_weights(_tiny(), bad_md)),
                       ("--init-from", lambda: _main(COMMON + ["--steps", "1", "--init-from", str(bad_md),
                                                               "--out", str(root / "never")]))):
        with pytest.raises(CheckpointError, match=r"\.metadata: refused to unpickle (builtins|io)\.open") as e:
            call()
        errors[name] = str(e.value)
    # b) a byte entry of the DCP data (the train state) that runs code: loaded with weights_only=True.
    bad_bytes = root / "bad_bytes"
    dcp.save({"model": {"w": torch.zeros(2)}, "train": {"step": 1, "x": _Plant(root / "pwned_bytes")}},
             checkpoint_id=str(bad_bytes), no_dist=True)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        read_train_state(bad_bytes)
    # c) the RNG file a resume reads: weights_only=True refuses the planted object, naming the file.
    (ckpt / "rng_rank0.pt").write_bytes(pickle.dumps({"torch": _Plant(root / "pwned_rng")}))
    (ckpt / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt: not an RNG state file"):
        _main(COMMON + ["--steps", "2", "--resume", "--out", str(run)])
    return {"pwned": sorted(p.name for p in root.glob("pwned*")), "errors": errors}


def _tiny():
    from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny"))


def test_1_planted_pickles_never_run(tmp_path):
    (res,) = run_distributed(_planted, 1, str(tmp_path))
    assert res["pwned"] == [], res  # no planted object ever ran
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- 2. two runs on one folder
def _descendants(pid: int) -> list[int]:
    """Every process whose parent chain reaches `pid` (torchrun's workers run in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _wait_for_steps(metrics: Path, n: int, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    raise AssertionError(f"{metrics}: fewer than {n} steps after {timeout} s")


def test_2_a_second_run_on_a_locked_folder_refuses_and_a_killed_run_frees_it(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m",
                              "tritonmoe.dsv3.train", *COMMON, "--steps", "100000", "--ckpt-every", "2", "--out",
                              str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out / "metrics.jsonl", 3, first)
        t0 = time.time()
        second = _cli([*COMMON, "--steps", "5", "--resume", "--out", str(out)])
        assert second.returncode == 2 and f"{out} is in use by another training run" in second.stderr, second.stderr
        assert time.time() - t0 < 60  # refused at once, not after waiting for the lock
    finally:
        workers = _descendants(first.pid)
        for pid in [first.pid, *workers]:  # the agent AND every worker, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.wait()
    for pid in workers:
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                break
            time.sleep(0.1)
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.endswith("}")]
    # The OS dropped the killed run's lock: the folder resumes, from its newest complete checkpoint.
    resumed = _cli([*COMMON, "--steps", str(max(steps) + 1), "--resume", "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step_" in resumed.stdout


def test_2_default_folders_started_together_never_collide(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "tritonmoe.dsv3.train", *COMMON, "--steps", "2"], env=ENV,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(next(ln.split("out: ", 1)[1] for ln in stdout.splitlines() if "out: " in ln))
    assert sorted(outs) == [os.path.join("runs", n) for n in ("tiny", "tiny-2", "tiny-3")]
    for o in outs:
        assert [json.loads(ln)["step"] for ln in (tmp_path / o / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ----------------------------------------------------------------------------- 3, 6, 14: flags and state guard
@pytest.mark.parametrize("args, match", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--min-lr-ratio", "-5"], r"--min-lr-ratio must be a finite number in \[0, 1\]"),
    (["--min-lr-ratio", "1.5"], r"--min-lr-ratio must be a finite number in \[0, 1\]"),
    (["--clip", "-1"], "--clip must be a finite number"),
    (["--warmup", "-5"], "--warmup must be >= 0"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*63\)"),
    (["--seq-len", "2"], "--seq-len 2 is too short"),  # 11: only the model's forward rejected it
    (["--micro-batch-size", "3"], "does not split into whole micro-batches"),
])
def test_3_14_bad_flags_refused_before_anything_is_written(tmp_path, args, match):
    res = _cli([*COMMON, *args, "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    import re
    assert re.search(match, res.stderr), res.stderr
    assert not (tmp_path / "o").exists()


def _nan_bias(root: str) -> dict:
    from tritonmoe.dsv3 import train
    from tritonmoe.dsv3.moe import routers
    from tritonmoe.dsv3.train import NonFiniteLossError
    from tritonmoe.parallel import load_model_weights

    out = Path(root) / "run"
    real = train.update_expert_bias
    calls = []

    def nan_at_step_3(model, **kw):  # the bias update of step 3 writes NaN (as a NaN rate did); losses stay finite
        counts = real(model, **kw)
        calls.append(1)
        if len(calls) == 3:
            routers(model)[0].e_score_correction_bias[0] = float("nan")
        return counts

    train.update_expert_bias = nan_at_step_3
    try:
        with pytest.raises(NonFiniteLossError, match="step 3: a parameter or buffer") as e:
            _main(COMMON + ["--steps", "5", "--ckpt-every", "1", "--out", str(out)])
    finally:
        train.update_expert_bias = real
    saved = load_model_weights(_tiny(), out / "step_00000002")
    finite = all(torch.isfinite(v).all() for v in saved.state_dict().values())
    return {"msg": str(e.value), "ckpts": sorted(p.name for p in out.glob("step_*")), "finite": finite,
            "steps": [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]}


def test_3_6_a_non_finite_state_is_never_saved_or_called_good(tmp_path):
    (res,) = run_distributed(_nan_bias, 1, str(tmp_path))
    assert "Last good checkpoint: " in res["msg"] and res["msg"].endswith("step_00000002"), res["msg"]
    assert res["ckpts"] == ["step_00000001", "step_00000002"] and res["steps"] == [1, 2] and res["finite"]


def test_6_config_rejects_non_finite_values(tmp_path):
    from tritonmoe.dsv3 import DeepseekV3Config

    cfg = DeepseekV3Config.from_hf("tiny").to_hf()
    cfg["bias_update_rate"] = float("nan")
    (tmp_path / "c.json").write_text(json.dumps(cfg))  # json writes NaN, which json.load reads back
    res = _cli([*COMMON, "--preset", str(tmp_path / "c.json"), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "bias_update_rate must be a finite number, got nan" in res.stderr, res.stderr


def test_14_steps_below_the_checkpoint_say_there_is_nothing_to_do(tmp_path):
    assert _cli([*COMMON, "--steps", "2", "--out", str(tmp_path / "r")]).returncode == 0
    res = _cli([*COMMON, "--steps", "1", "--resume", "--out", str(tmp_path / "r")])
    assert res.returncode == 0 and "nothing to do" in res.stdout and "step 2 >= --steps 1" in res.stdout, res.stdout


def test_resume_with_only_out_continues_the_run_it_finds(tmp_path):
    # Before: `--out DIR --resume` alone fell back to the defaults of --batch-size, --seq-len, --lr, --data, the
    # preset (tiny)... and was refused for differing from the checkpoint, and another --preset of the same shapes
    # resumed silently. Now the checkpoint's recorded options, its config.json and its schedule's end are the
    # defaults, and a model config that differs is refused.
    import json

    from helpers import tiny_aux_preset

    run = [*COMMON, "--lr", "1e-3", "--preset", tiny_aux_preset(tmp_path), "--decay-steps", "3"]
    assert _cli([*run, "--steps", "3", "--out", str(tmp_path / "whole")]).returncode == 0
    assert _cli([*run, "--steps", "2", "--out", str(tmp_path / "cut")]).returncode == 0
    res = _cli(["--out", str(tmp_path / "cut"), "--resume"])
    assert res.returncode == 0, res.stderr
    losses = {name: [json.loads(ln)["loss"] for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("whole", "cut")}
    assert losses["cut"] == losses["whole"]  # steps 1-2, then 3 from the checkpoint: bit-identical
    res = _cli(["--out", str(tmp_path / "cut"), "--resume", "--steps", "4", "--preset", "tiny"])
    assert res.returncode == 2 and "another model config (" in res.stderr, res.stderr
    assert "seq_aux_loss_alpha 0.01 there, 0.0 here" in res.stderr, res.stderr


# ----------------------------------------------------------------------------- 5. corrupted checkpoint bytes
def _corrupt(root: str) -> dict:
    from tritonmoe.parallel import CheckpointError, load_model_weights

    out = Path(root) / "run"
    _main(COMMON + ["--steps", "4", "--ckpt-every", "2", "--out", str(out)])
    data = sorted((out / "step_00000004").glob("*.distcp"))[0]
    raw = bytearray(data.read_bytes())
    for i in range(64):  # 64 flipped bytes in the middle of the data
        raw[len(raw) // 2 + i] ^= 0xFF
    data.write_bytes(bytes(raw))
    msgs = {}
    with pytest.raises(CheckpointError) as e:
        _main(COMMON + ["--steps", "6", "--resume", "--out", str(out)])
    msgs["resume"] = str(e.value)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(_tiny(), out / "step_00000004")
    msgs["weights"] = str(e.value)
    return msgs


def test_5_corrupted_bytes_are_detected_and_the_intact_checkpoint_named(tmp_path):
    (msgs,) = run_distributed(_corrupt, 1, str(tmp_path))
    assert "__0_0.distcp does not match the checksum recorded when it was saved" in msgs["resume"], msgs
    assert f"the newest intact checkpoint is {tmp_path / 'run' / 'step_00000002'}" in msgs["resume"], msgs
    assert "__0_0.distcp does not match the checksum" in msgs["weights"], msgs


def test_durability_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    def go(root):
        import os as _os

        from tritonmoe.parallel import checkpoint as ck

        synced, renamed = [], []
        real_fsync, real_rename = _os.fsync, Path.rename

        def fsync(fd):
            synced.append(_os.readlink(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)

        def rename(self, target):
            renamed.append((str(self), str(target), list(synced)))
            return real_rename(self, target)

        ck.os.fsync = fsync
        Path.rename = rename
        try:
            _main(COMMON + ["--steps", "1", "--out", str(Path(root) / "r")])
        finally:
            ck.os.fsync, Path.rename = real_fsync, real_rename
        return renamed, synced

    (renamed, synced), = run_distributed(go, 1, str(tmp_path))
    tmp_dir, final, before = next(r for r in renamed if r[1].endswith("step_00000001"))
    for name in ("rng_rank0.pt", "config.json", "checksums.json", "meta.json"):
        assert os.path.join(tmp_dir, name) in before, name
    assert tmp_dir in before  # the folder itself, so its entries are durable
    assert str(tmp_path / "r") in synced  # and the parent after the rename


# ----------------------------------------------------------------------------- 11. folders that could not rerun
def test_11_a_folder_without_a_recorded_step_is_reusable(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # a run killed during step 1
    (out / ".step_00000001.tmp").mkdir()
    res = _cli([*COMMON, "--steps", "1", "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    again = _cli([*COMMON, "--steps", "1", "--out", str(out)])
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr


def test_11_resume_drops_a_half_written_last_line(tmp_path):
    out = tmp_path / "r"
    assert _cli([*COMMON, "--steps", "2", "--out", str(out)]).returncode == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the disk filled up mid-write
    res = _cli([*COMMON, "--steps", "3", "--resume", "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert "dropping a half-written last line" in res.stderr
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ----------------------------------------------------------------------------- 13. one line, exit 2
def test_13_user_errors_are_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"\0" * 8)
    (hf / "config.json").write_text("{}")
    (tmp_path / "broken.json").write_text("{not json")
    cases = [(["--preset", str(tmp_path / "folder")], "the folder holds no config.json"),
             (["--preset", str(tmp_path / "broken.json")], "is not a readable JSON config"),
             (["--out", str(tmp_path / "afile")], "is a file, not a folder"),
             (["--out", str(tmp_path / "afile" / "sub")], r"--out .*afile/sub: cannot use it \(Not a directory\)"),
             (["--init-from", str(hf)], "not a DCP checkpoint .* convert it first"),
             (["--seed", "1e20"], "invalid int value")]
    import re
    for args, match in cases:
        res = _cli([*COMMON, "--steps", "1", *args])
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr and re.search(match, res.stderr), (args, res.stderr)


# ----------------------------------------------------------------------------- 4, 12, 15: kernels
def test_4_group_sizes_wrapping_to_m_are_refused_and_never_read_out_of_bounds():
    from tritonmoe.kernels import force_twins, grouped_gemm
    from tritonmoe.kernels.grouped_gemm import _grouped_mm_wgrad_launch

    x, w = torch.randn(16, 8), torch.randn(4, 4, 8)
    sizes = torch.tensor([2**62, 2**62, 2**62, 2**62 + 16])  # the int64 sum wraps around to 16 == M
    assert int(sizes.sum()) == 16
    for twin in (False, True):
        with force_twins() if twin else torch.no_grad():
            with pytest.raises(ValueError, match=r"exceed the M=16 rows"):
                grouped_gemm(x, w, sizes)
    # The kernel itself (what a CUDA launch reaches before its async assert fires): clamped, no stray read.
    dw = _grouped_mm_wgrad_launch(torch.randn(16, 4), x, sizes, 4)
    assert torch.isfinite(dw).all()


def test_12_zero_size_inputs():
    from tritonmoe.kernels import swiglu

    for shape in ((8, 0), (0, 8), (3, 0, 4)):
        gu = torch.randn(shape, requires_grad=True)
        h = swiglu(gu)
        h.sum().backward()
        assert h.shape == (*shape[:-1], shape[-1] // 2) and gu.grad.shape == gu.shape


def test_15_every_backend_refuses_the_same_bad_input():
    from tritonmoe.kernels import force_twins, gather_grouped_gemm, unpermute

    y = torch.randn(6, 4)
    repeated = torch.tensor([[0, 1], [1, 2], [3, 4]])  # row 1 twice
    x, w = torch.randn(3, 8), torch.randn(2, 4, 8)
    src, row_map = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([[0, 1], [2, 3], [4, 5]])
    for twin in (False, True):
        with force_twins() if twin else torch.no_grad():
            with pytest.raises(ValueError, match="row_map repeats row 1"):
                unpermute(y, repeated)
            with pytest.raises(ValueError, match="sum to 5, but x has M=6 rows"):
                gather_grouped_gemm(x, w, torch.tensor([2, 3]), src, row_map)
