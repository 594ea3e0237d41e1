"""Benchmarks in CI: pytest-benchmark entries for the CPU paths at tiny shapes (run once as plain tests under
--benchmark-disable, timed with `pytest tests/test_bench.py --benchmark-enable`), each checked against an
independent formula, plus a smoke test that `python -m bench --quick` writes the JSON the issue asks for."""

import dataclasses
import json
import os

import pytest
import torch

from bench import __main__ as bench_main
from bench import bench_grouped_gemm, bench_moe, bench_permute, bench_swiglu, common
from helpers import assert_close

from tritonmoe.kernels import grouped_gemm_torch, permute_torch, swiglu, swiglu_torch, unpermute_torch


def test_grouped_gemm_twin(benchmark):
    # Zipf sizes with an empty group: the case the loop and the twin must both get right.
    sizes = bench_grouped_gemm.group_sizes_for(8, 16, "zipf")
    assert 0 in sizes
    x, w = torch.randn(sum(sizes), 48), torch.randn(8, 40, 48)
    bounds = [(sum(sizes[:g]), sum(sizes[:g + 1])) for g in range(8)]
    y = benchmark(grouped_gemm_torch, x, w, torch.tensor(sizes))
    assert_close(y, bench_grouped_gemm._loop_fwd(x, w, bounds), 1e-5, what="grouped_gemm twin vs loop")


def test_permute_twin(benchmark):
    x = torch.randn(37, 24)  # T not a multiple of anything
    topk_idx, _ = bench_permute.random_routing(37, 4, 11, torch.device("cpu"))
    out = benchmark(permute_torch, x, topk_idx, 11)
    # Expected from the definition: rows in (expert, token, j) order, so row r of x_sorted is routed copy
    # order[r] (flat index t*K + j), and row_map inverts that order.
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat * flat.numel() + torch.arange(flat.numel()))
    assert torch.equal(out[0], x[order // 4])
    assert torch.equal(out[1].long(), torch.bincount(flat, minlength=11))
    assert torch.equal(out[2].long(), torch.argsort(order).view(37, 4))


def test_unpermute_twin(benchmark):
    topk_idx, topk_w = bench_permute.random_routing(37, 4, 11, torch.device("cpu"))
    _, _, row_map = permute_torch(torch.randn(37, 24), topk_idx, 11)
    y_sorted = torch.randn(37 * 4, 24)
    y = benchmark(unpermute_torch, y_sorted, row_map, topk_w)
    ref = bench_permute.torch_index_unpermute(y_sorted, *bench_permute.combine_metadata(row_map, topk_w,
                                                                                        torch.float32), 37)
    assert_close(y, ref, 1e-5, what="unpermute twin vs index_add_")


def test_swiglu_twin(benchmark):
    gu = torch.randn(37, 2 * 24) * 3
    h = benchmark(swiglu_torch, gu)
    gate, up = gu[:, :24], gu[:, 24:]
    assert_close(h, gate * torch.sigmoid(gate) * up, 1e-6, what="swiglu twin vs its definition")


def test_swiglu_saved_bytes_counts_what_backward_keeps():
    # The kernel path (interpreted here) keeps gate_up alone; the eager formula keeps silu(gate) as well.
    R, I = 16, 8  # noqa: E741
    gu = torch.randn(R, 2 * I)
    assert bench_swiglu.saved_bytes(swiglu, gu) == R * 2 * I * 4
    assert bench_swiglu.saved_bytes(bench_swiglu.torch_eager, gu) == R * 3 * I * 4


def test_moe_forward(benchmark):
    # E=8 in 4 groups, 2 kept, top-4: group-limited routing is exercised, not a no-op.
    s = bench_moe.LayerShape(H=32, I=16, E=8, K=4, n_group=4, topk_group=2)
    layers = bench_moe.build_layers(s, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 9, s.H)
    with common.cpu_twin_path(torch.device("cpu")), torch.no_grad():
        y = benchmark(layers["ours"], x)
        ref = layers["hf_eager"](x)
    assert_close(y, ref, 1e-5, what="tritonmoe MoE vs transformers eager")


def test_gemm_gradient_passes_time_one_kernel_each(monkeypatch):
    # A custom op's backward computes every gradient whose input required grad in the forward, whatever
    # autograd.grad asks for: the dgrad and wgrad timings must each run on a graph that launches only their
    # own kernel. Ours is the interpreted Triton op here, as it is the compiled one on CUDA.
    import importlib

    gg = importlib.import_module("tritonmoe.kernels.grouped_gemm")
    calls = []
    for name in ("_grouped_mm_launch", "_grouped_mm_wgrad_launch"):
        launch = getattr(gg, name)
        monkeypatch.setattr(gg, name, lambda *a, _n=name, _f=launch, **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setattr(common, "ours_op", lambda name, device: (gg.grouped_gemm, "triton (interpreter)"))
    sizes, w = torch.tensor([3, 5]), torch.randn(2, 8, 16)
    sets = [{"x": torch.randn(8, 16), "dy": torch.randn(8, 8)}]
    offs = torch.cumsum(sizes, 0).int()
    for pas, kernel in (("dgrad", "_grouped_mm_launch"), ("wgrad", "_grouped_mm_wgrad_launch")):
        fn, arg_sets, _ = bench_grouped_gemm._providers(pas, torch.device("cpu"), sets, w, torch.randn(8, 16),
                                                        sizes, offs, [(0, 3), (3, 8)])["ours"]
        calls.clear()
        fn(*arg_sets[0])
        assert calls == [kernel], (pas, calls)


def test_group_sizes_distributions():
    assert bench_grouped_gemm.group_sizes_for(32, 100, "balanced") == [100] * 32
    z = bench_grouped_gemm.group_sizes_for(32, 100, "zipf")
    assert sum(z) == 3200 and z.count(0) == 4 and max(z) > 4 * 100  # skewed, 1/8 of groups empty
    with pytest.raises(ValueError, match="uniform"):
        bench_grouped_gemm.group_sizes_for(4, 10, "uniform")


def test_ratios_against_best_peer_and_ceiling():
    rows = [common.row("b", {"n": 1}, p, "x", None, r, "u") for p, r in
            (("ours", 6.0), ("a", 4.0), ("b", 3.0), ("c", 12.0), ("d", None))]
    common.add_ratios(rows, ["n"], "ours", ["a", "b", "d"], "c")
    assert rows[0]["vs_best_peer"] == 1.5 and rows[0]["best_peer"] == "a" and rows[0]["of_ceiling"] == 0.5


def test_only_rejects_unknown_benchmark():
    with pytest.raises(ValueError, match="gemmm"):
        bench_main._parse_only("gemm,gemmm")


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads, interp = torch.get_num_threads(), os.environ.get("TRITON_INTERPRET")
    bench_main.main(["--quick", "--out", str(out)])
    # The run must leave the process as it found it (the suite runs the interpreter; CI sets threads).
    assert torch.get_num_threads() == threads and os.environ.get("TRITON_INTERPRET") == interp
    doc = json.loads(out.read_text())
    meta = doc["meta"]
    for key in ("device_name", "torch", "triton", "date_utc", "device_type"):
        assert meta[key], key
    assert meta["providers"] == {"gemm": ["ours", "grouped_mm", "loop", "dense"],
                                 "permute": ["ours", "torch_index", "copy"],
                                 "swiglu": ["ours", "torch_eager", "copy"],
                                 "fp8": ["fp8", "bf16", "scaled_grouped_mm", "ours", "torch", "copy"],
                                 "moe": ["ours", "hf_grouped", "titan", "hf_eager"]}
    rows = doc["results"]
    for bench, providers in meta["providers"].items():
        mine = [r for r in rows if r["bench"] == bench_main.BENCHES[bench].NAME]
        assert {r["provider"] for r in mine} == set(providers), bench
        # torch._scaled_grouped_mm has no CPU kernel: its rows record that instead of a time.
        ran = [r for r in mine if not (r["provider"] == "scaled_grouped_mm" and "NotImplementedError" in
                                       r.get("error", ""))]
        # Every other provider ran (torch._grouped_mm runs on CPU in torch >= 2.9) and has a positive median.
        assert all(r["rate"] and r["rate"] > 0 and r["median_ms"] > 0 and "error" not in r for r in ran), bench
        assert all("vs_best_peer" in r for r in mine if r["provider"] == "ours"), bench
    gemm = [r for r in rows if r["bench"] == "grouped_gemm"]
    assert {r["pass"] for r in gemm} == {"fwd", "dgrad", "wgrad"} and {r["dist"] for r in gemm} == {"balanced", "zipf"}
    assert all(r["max_rel_err_vs_loop"] < 1e-4 for r in gemm if r["provider"] in ("ours", "grouped_mm"))
    assert all(r["matches_torch_index"] for r in rows if r["bench"] == "permute" and r["op"] == "permute"
               and r["provider"] == "ours")
    assert all(r["max_rel_err_y"] < 1e-4 for r in rows if r["bench"] == "moe")
    assert all(r["max_rel_err_h"] < 1e-5 and r["max_rel_err_dgate_up"] < 1e-5 for r in rows
               if r["bench"] == "swiglu" and r["provider"] == "ours")
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].split()[0] == str(rows[-1]["T"])  # the table comes last


@pytest.mark.parametrize("overrides", [
    {},  # the tiny preset: q LoRA, one dense layer, MTP
    {"q_lora_rank": None, "n_shared_experts": 2, "first_k_dense_replace": 2},  # plain q_proj (V2-Lite style)
])
def test_scale_closed_form_param_count_matches_meta_model(overrides):
    from bench import scale
    from tritonmoe.dsv3 import DeepseekV3Config

    c = dataclasses.asdict(DeepseekV3Config.from_hf("tiny", **overrides))
    assert scale.meta_params(c) == scale.analytic_params(c)


def test_scale_memory_shards_with_gpus_and_a2a_grows_with_ep():
    from bench import scale

    c = scale.config_671b()
    p = scale.analytic_params(c)
    a, b = (scale.estimate(scale.Layout(n, 8), c, p, 4096, 4096, 2**26, "deepep") for n in (64, 128))
    assert b["params_gb"] == pytest.approx(a["params_gb"] / 2, rel=1e-3)
    ep8, ep64 = (scale.estimate(scale.Layout(512, ep), c, p, 4096, 4096, 2**26, "deepep") for ep in (8, 64))
    assert ep8["a2a_gb_per_layer"] < ep64["a2a_gb_per_layer"]  # more peers off the rank, more rows sent
    # EP <= 8 stays on NVLink: 4 exchanges of T*K*H bf16 rows, 7/8 of them off-rank.
    assert ep8["a2a_gb_per_layer"] == pytest.approx(4 * 4096 * 8 * 7168 * 2 * 7 / 8 / 1e9, rel=1e-3)
