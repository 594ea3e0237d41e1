"""Streaming conversion (dsv3/convert.py): HF <-> DCP both ways, FP8, errors naming keys, interrupted reruns,
the peak-memory bound, and loading the DCP output into a 4-process gloo FSDP+EP model.

Synthetic checkpoints only (builders shared with test_checkpoint.py).
"""

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from helpers import assert_close
from test_checkpoint import TINY, _read_all, hf_mtp, hf_tiny, make_hf_checkpoint, quantize_fp8_blockwise  # noqa: F401
from tritonmoe.dsv3 import checkpoint as ck
from tritonmoe.dsv3 import convert

transformers = pytest.importorskip("transformers")


def load_dcp(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the "model" entry of a DCP checkpoint, by our name (test-side reader)."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(path).read_metadata()
    sd = {fqn.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
          for fqn, m in md.state_dict_metadata.items() if fqn.startswith("model.")}
    with warnings.catch_warnings():  # DCP warns that there is no process group: single-process on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": sd}, checkpoint_id=path, no_dist=True)
    return sd


def _quiet(_msg):
    pass


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory, hf_mtp):
    """The tiny checkpoint with its MTP layer, in bf16 (the published dtype besides FP8), 3 shards."""
    path, _ = hf_mtp
    tensors = {k: v if k.endswith("e_score_correction_bias") else v.bfloat16() for k, v in _read_all(path).items()}
    config = json.loads((path / ck.CONFIG_FILE).read_text())
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_bf16"), tensors, config)


def test_round_trip_bit_exact_bf16_and_transformers_logits(tmp_path, hf_bf16):
    assert convert.main(["hf2dcp", "--input", str(hf_bf16), "--output", str(tmp_path / "dcp")]) == 0
    ours = load_dcp(tmp_path / "dcp")
    assert ours["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert ours["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.mtp.0.layer.mlp.experts.down_proj" in ours and not any("shared_head.head" in k for k in ours)
    assert convert.main(["dcp2hf", "--input", str(tmp_path / "dcp"), "--output", str(tmp_path / "hf")]) == 0
    src, back = _read_all(hf_bf16), _read_all(tmp_path / "hf")
    assert back.keys() == src.keys()
    for k in src:
        assert back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]), k
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_bf16).eval()
    got = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    with torch.no_grad():
        assert torch.equal(got(input_ids).logits, ref(input_ids).logits)


def test_fp8_source_dequantized_into_dcp_and_back(tmp_path, hf_mtp):
    path, _ = hf_mtp
    src = _read_all(path)
    config = json.loads((path / ck.CONFIG_FILE).read_text())
    # As published: the FP8 block scheme is declared in config.json.
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    make_hf_checkpoint(tmp_path / "fp8", src, config, fp8=True)
    convert.hf2dcp(tmp_path / "fp8", tmp_path / "dcp", torch.float32, log=_quiet)
    ours = load_dcp(tmp_path / "dcp")
    dcp_config = json.loads((tmp_path / "dcp" / ck.CONFIG_FILE).read_text())
    assert "quantization_config" not in dcp_config  # the weights are not FP8 any more

    def dequant(key):  # direct computation: one 128x128 tile covers these tiny weights
        q, s = quantize_fp8_blockwise(src[key])
        return q.float() * s[0, 0]

    assert torch.equal(ours["model.layers.0.self_attn.q_b_proj.weight"], dequant("model.layers.0.self_attn.q_b_proj.weight"))
    assert torch.equal(ours["model.mtp.0.layer.mlp.experts.gate_up_proj"][7, 16:],
                       dequant("model.layers.3.mlp.experts.7.up_proj.weight"))
    assert torch.equal(ours["model.layers.1.mlp.gate.weight"], src["model.layers.1.mlp.gate.weight"])  # not quantized
    convert.dcp2hf(tmp_path / "dcp", tmp_path / "hf", log=_quiet)
    back = _read_all(tmp_path / "hf")
    assert not any(k.endswith(ck.SCALE_SUFFIX) for k in back) and back.keys() == src.keys()
    assert torch.equal(back["model.layers.2.mlp.experts.11.down_proj.weight"],
                       dequant("model.layers.2.mlp.experts.11.down_proj.weight"))
    # transformers loads the export as the plain fp32 checkpoint it is (with the FP8 quantization_config still in
    # config.json it demanded accelerate and would have re-quantized the weights).
    tf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(tf_model.model.layers[0].self_attn.q_b_proj.weight,
                       dequant("model.layers.0.self_attn.q_b_proj.weight"))

    index = json.loads((tmp_path / "fp8" / ck.INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.2.self_attn.o_proj.weight_scale_inv"]
    (tmp_path / "fp8" / ck.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight is stored as float8_e4m3fn"):
        convert.hf2dcp(tmp_path / "fp8", tmp_path / "dcp2", torch.float32, log=_quiet)


def test_errors_name_the_key_and_pickles_are_refused(tmp_path, hf_mtp):
    path, _ = hf_mtp
    src = _read_all(path)
    config = json.loads((path / ck.CONFIG_FILE).read_text())
    (tmp_path / "bin").mkdir()
    torch.save({}, tmp_path / "bin" / "pytorch_model.bin")
    # Through the real module entry point, as a user runs it.
    run = subprocess.run([sys.executable, "-m", "tritonmoe.dsv3.convert", "hf2dcp", "--input", str(tmp_path / "bin"),
                          "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "execute arbitrary code" in run.stderr, run.stderr

    missing = {k: v for k, v in src.items() if k != "model.layers.3.hnorm.weight"}
    make_hf_checkpoint(tmp_path / "missing", missing, config)
    with pytest.raises(ValueError, match=r"missing key.*model\.mtp\.0\.hnorm\.weight \(HF model\.layers\.3\.hnorm\.weight\)"):
        convert.hf2dcp(tmp_path / "missing", tmp_path / "o", log=_quiet)

    shaped = {**src, "model.layers.2.mlp.experts.4.gate_proj.weight": torch.zeros(17, 32)}
    make_hf_checkpoint(tmp_path / "shape", shaped, config)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.4\.gate_proj\.weight: shape \(17, 32\)"):
        convert.hf2dcp(tmp_path / "shape", tmp_path / "o", log=_quiet)

    make_hf_checkpoint(tmp_path / "gone", src, config)
    (tmp_path / "gone" / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard model-00003-of-00003\.safetensors .*missing"):
        convert.hf2dcp(tmp_path / "gone", tmp_path / "o", log=_quiet)
    assert not (tmp_path / "o").exists()


def test_transformers_saved_checkpoint_without_mtp_layers(tmp_path, hf_tiny):
    path, _ = hf_tiny  # config.json says num_nextn_predict_layers=1, transformers wrote no MTP layer
    lines = []
    convert.hf2dcp(path, tmp_path / "dcp", torch.float32, log=lines.append)
    assert "converting without MTP" in lines[0]
    assert json.loads((tmp_path / "dcp" / ck.CONFIG_FILE).read_text())["num_nextn_predict_layers"] == 0
    assert not any(k.startswith("model.mtp.") for k in load_dcp(tmp_path / "dcp"))
    convert.dcp2hf(tmp_path / "dcp", tmp_path / "hf", log=_quiet)
    src, back = _read_all(path), _read_all(tmp_path / "hf")
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)


def test_interrupted_conversion_resumes(tmp_path, hf_bf16, monkeypatch):
    import torch.distributed.checkpoint as dcp

    real_save, saves = dcp.save, []

    def save_then_die(*args, **kwargs):
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated interruption during the third layer group")
        saves.append(1)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert.hf2dcp(hf_bf16, tmp_path / "dcp", log=_quiet)
    assert not (tmp_path / "dcp").exists() and (tmp_path / "dcp.partial").exists()
    monkeypatch.setattr(dcp, "save", real_save)
    lines = []
    convert.hf2dcp(hf_bf16, tmp_path / "dcp", log=lines.append)
    assert sum("(done before)" in line for line in lines) == 2, lines
    assert any("ETA" in line and "shards" in line for line in lines)
    assert not (tmp_path / "dcp.partial").exists()
    convert.hf2dcp(hf_bf16, tmp_path / "clean", log=_quiet)
    resumed, clean = load_dcp(tmp_path / "dcp"), load_dcp(tmp_path / "clean")
    assert resumed.keys() == clean.keys() and all(torch.equal(resumed[k], clean[k]) for k in clean)

    again = []  # rerunning a finished conversion is a no-op; other options need --overwrite
    convert.hf2dcp(hf_bf16, tmp_path / "dcp", log=again.append)
    assert "nothing to do" in again[-1]
    with pytest.raises(ValueError, match="--overwrite"):
        convert.hf2dcp(hf_bf16, tmp_path / "dcp", torch.float32, log=_quiet)


# ------------------------------------------------------------------------------------------------------------
# Peak memory on a few-hundred-MB checkpoint, measured in a fresh process
BIG = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=6,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=64, n_shared_experts=1,
           num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=128,
           kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=1,
           tie_word_embeddings=False, model_type="deepseek_v3")

_MEASURE = textwrap.dedent("""
    import json, sys, time
    import torch
    import torch.distributed.checkpoint
    from tritonmoe.dsv3 import convert
    # Everything the converter imports and builds besides tensor data, before the baseline: the bound is on
    # the memory that tensors take, not on code.
    convert._expected_state(json.load(open(sys.argv[1] + "/config.json")))
    # Copies and casts are memory-bound; with 2 contended cores, OpenMP threads made them ~50x slower here.
    torch.set_num_threads(1)
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    base = hwm()
    t0 = time.monotonic()
    stats = convert.hf2dcp(sys.argv[1], sys.argv[2], torch.bfloat16, log=lambda s: None)
    print(json.dumps({"baseline": base, "peak": hwm(), "seconds": time.monotonic() - t0, **stats}))
""")


def _write_big_checkpoint(out: Path) -> int:
    """Random bf16 weights for BIG, written layer by layer (never the whole model in memory) into ~40 MB
    shards so layers straddle files. Returns the largest layer's bytes."""
    from tritonmoe.dsv3.convert import _expected_state

    expected, buffers = _expected_state(BIG)
    layout = ck.CheckpointLayout.from_hf_config(BIG)
    groups: dict = {}
    for k in expected:
        groups.setdefault(ck.ours_group_of(k, layout), []).append(k)
    writer = ck.ShardedSafetensorsWriter(out, max_shard_bytes=40 * 2**20)
    main = {}
    largest = 0
    for g in sorted(groups, key=lambda g: -1 if g is None else g):
        tensors = {k: (torch.randn(expected[k].shape) * 0.02).to(torch.float32 if k in buffers else torch.bfloat16)
                   for k in groups[g]}
        if g is None:
            main = tensors
        largest = max(largest, sum(t.numel() * t.element_size() for t in tensors.values()))
        for hf_key, t in ck.iter_ours_to_hf(tensors, layout, main.__getitem__):
            writer.add(hf_key, t)
    writer.finish()
    (out / ck.CONFIG_FILE).write_text(json.dumps(BIG))
    return largest


def test_peak_memory_stays_near_one_layer(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _MEASURE
    try:
        largest = _write_big_checkpoint(tmp_path / "hf")
    finally:
        torch.set_num_threads(threads)
    total = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    assert total > 250 * 2**20 and len(list((tmp_path / "hf").glob("*.safetensors"))) > 5
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "hf"), str(tmp_path / "dcp")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["baseline"]
    rate = r["bytes_read"] / 2**20 / r["seconds"]
    print(f"\nhf2dcp on {total / 2**20:.0f} MiB: peak RSS growth {growth / 2**20:.0f} MiB, largest layer "
          f"{largest / 2**20:.0f} MiB ({growth / largest:.2f}x), {rate:.0f} MiB/s")
    assert growth < 3 * largest, f"peak RSS grew {growth / 2**20:.0f} MiB, largest layer {largest / 2**20:.0f} MiB"
    assert growth < total / 2  # and clearly not the whole model


# ------------------------------------------------------------------------------------------------------------
# The converted checkpoint in a 4-process gloo FSDP+EP model
def _load_sharded(dcp_dir: str, config_path: str, input_ids: torch.Tensor, ep: int) -> dict:
    """On each rank: a model with other random weights, EP over `ep` + FSDP, load_model_weights, forward."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
    from tritonmoe.parallel import apply_expert_parallel, apply_fsdp, build_meshes, load_model_weights

    torch.manual_seed(100 + dist.get_rank())  # weights that differ from the checkpoint and between ranks
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf(config_path))
    meshes = build_meshes(ep, model.config.n_routed_experts)
    apply_expert_parallel(model, meshes.expert)
    apply_fsdp(model, meshes.dense, meshes.expert)
    load_model_weights(model, dcp_dir)
    with torch.no_grad():
        logits = model(input_ids).logits
    shards = {}
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert isinstance(p, DTensor)
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            shards[name] = (tuple(offset), p.to_local().clone())
    return {"logits": logits, "shards": shards, "ep_rank": meshes.expert["ep"].get_local_rank()}


def _four_ranks(dcp_dir, config_path, input_ids):
    return [_load_sharded(dcp_dir, config_path, input_ids, ep) for ep in (4, 2)]


def test_dcp_loads_into_four_process_fsdp_ep_model(tmp_path, hf_mtp):
    from dist_utils import run_distributed

    path, tf_model = hf_mtp
    convert.hf2dcp(path, tmp_path / "dcp", torch.float32, log=_quiet)
    stacked = load_dcp(tmp_path / "dcp")
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    with torch.no_grad():
        ref = tf_model(input_ids).logits
    results = run_distributed(_four_ranks, 4, str(tmp_path / "dcp"), str(tmp_path / "dcp" / ck.CONFIG_FILE),
                              input_ids, timeout=240)
    E = TINY["n_routed_experts"]
    for rank, per_ep in enumerate(results):
        for ep, r in zip((4, 2), per_ep):
            assert_close(r["logits"], ref, 1e-5, what=f"rank {rank} ep={ep} logits")
            assert r["ep_rank"] == rank % ep
            for name, (offset, local) in r["shards"].items():
                key = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
                n = local.shape[0]
                assert torch.equal(local, stacked[key][offset[0]:offset[0] + n]), (rank, ep, name)
                if ep == 4:  # edp = 1: rank r holds exactly experts [r*E/ep, (r+1)*E/ep)
                    assert (offset[0], n) == (rank * E // ep, E // ep), (rank, name, offset)


def test_dcp2hf_exports_a_training_checkpoint(tmp_path):
    """A full training checkpoint (model + optimizer + train state, parallel.save_checkpoint) -> HF; the
    optimizer entries are skipped and transformers computes our logits."""
    from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
    from tritonmoe.parallel import save_checkpoint

    cfg = DeepseekV3Config.from_hf({**TINY, "model_type": "deepseek_v3"})
    model = DeepseekV3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    for p in model.parameters():  # an optimizer step without a backward through the kernel interpreter
        p.grad = torch.randn_like(p)
    opt.step()
    ckpt = save_checkpoint(tmp_path / "run", 1, model, opt)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    convert.main(["dcp2hf", "--input", str(ckpt), "--output", str(tmp_path / "hf"),
                  "--config", str(tmp_path / "config.json")])
    tf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close(tf_model(input_ids).logits, model(input_ids).logits, 1e-5, what="logits")
    assert any(".layers.3.shared_head.head" in k for k in _read_all(tmp_path / "hf"))  # MTP exported too
