"""Streaming conversion (dsv3/convert.py): HF <-> DCP both ways, FP8, errors naming keys, interrupted reruns,
the peak-memory bound, and loading the DCP output into a 4-process gloo FSDP+EP model.

Synthetic checkpoints only (builders shared with test_checkpoint.py).
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from helpers import assert_close
from test_checkpoint import TINY, _read_all, hf_mtp, hf_tiny, make_hf_checkpoint, quantize_fp8_blockwise  # noqa: F401
from tritonmoe.dsv3 import hf_mapping as hm
from tritonmoe.dsv3.model import DeepseekV3ForCausalLM
from tritonmoe.dsv3 import safetensors_io as sio
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
    """The tiny checkpoint with its MTP layer, in bf16 (the published dtype besides FP8) but for the routers'
    weights and biases, which transformers keeps in fp32; 3 shards."""
    path, _ = hf_mtp
    tensors = {k: v if k.endswith(("e_score_correction_bias", "mlp.gate.weight")) else v.bfloat16()
               for k, v in _read_all(path).items()}
    config = json.loads((path / sio.CONFIG_FILE).read_text())
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
    config = json.loads((path / sio.CONFIG_FILE).read_text())
    # As published: the FP8 block scheme is declared in config.json.
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    make_hf_checkpoint(tmp_path / "fp8", src, config, fp8=True)
    convert.hf2dcp(tmp_path / "fp8", tmp_path / "dcp", torch.float32, log=_quiet)
    ours = load_dcp(tmp_path / "dcp")
    dcp_config = json.loads((tmp_path / "dcp" / sio.CONFIG_FILE).read_text())
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
    assert not any(k.endswith(sio.SCALE_SUFFIX) for k in back) and back.keys() == src.keys()
    assert torch.equal(back["model.layers.2.mlp.experts.11.down_proj.weight"],
                       dequant("model.layers.2.mlp.experts.11.down_proj.weight"))
    # transformers loads the export as the plain fp32 checkpoint it is (with the FP8 quantization_config still in
    # config.json it demanded accelerate and would have re-quantized the weights).
    tf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(tf_model.model.layers[0].self_attn.q_b_proj.weight,
                       dequant("model.layers.0.self_attn.q_b_proj.weight"))

    index = json.loads((tmp_path / "fp8" / sio.INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.2.self_attn.o_proj.weight_scale_inv"]
    (tmp_path / "fp8" / sio.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight is stored as float8_e4m3fn"):
        convert.hf2dcp(tmp_path / "fp8", tmp_path / "dcp2", torch.float32, log=_quiet)


def test_errors_name_the_key_and_pickles_are_refused(tmp_path, hf_mtp):
    path, _ = hf_mtp
    src = _read_all(path)
    config = json.loads((path / sio.CONFIG_FILE).read_text())
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
    assert "no MTP layers" in lines[0] and "dropping MTP" in lines[0]
    assert json.loads((tmp_path / "dcp" / sio.CONFIG_FILE).read_text())["num_nextn_predict_layers"] == 0
    assert not any(k.startswith("model.mtp.") for k in load_dcp(tmp_path / "dcp"))
    convert.dcp2hf(tmp_path / "dcp", tmp_path / "hf", log=_quiet)
    src, back = _read_all(path), _read_all(tmp_path / "hf")
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)


def interrupt_hf2dcp_after(saves: int, src: Path, out: Path, monkeypatch) -> None:
    """Run hf2dcp and interrupt it (KeyboardInterrupt) when it starts DCP save number `saves` + 1."""
    import torch.distributed.checkpoint as dcp

    real_save, done = dcp.save, []

    def save_then_die(*args, **kwargs):
        if len(done) == saves:
            raise KeyboardInterrupt(f"simulated interruption during layer group {saves + 1}")
        done.append(1)
        return real_save(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(dcp, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            convert.hf2dcp(src, out, log=_quiet)


def test_interrupted_conversion_resumes(tmp_path, hf_bf16, monkeypatch):
    interrupt_hf2dcp_after(2, hf_bf16, tmp_path / "dcp", monkeypatch)
    assert not (tmp_path / "dcp").exists() and (tmp_path / "dcp.partial").exists()
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
    from tritonmoe.dsv3.checkpoint import build_meta_model
    from tritonmoe.dsv3.model import DeepseekV3ForCausalLM
    build_meta_model(json.load(open(sys.argv[4])), DeepseekV3ForCausalLM)
    # Copies and casts are memory-bound; with 2 contended cores, OpenMP threads made them ~50x slower here.
    torch.set_num_threads(1)
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    base = hwm()
    t0 = time.monotonic()
    if sys.argv[1] == "hf2dcp":
        stats = convert.hf2dcp(sys.argv[2], sys.argv[3], torch.bfloat16, log=lambda s: None)
    else:  # the default 5 GB shard: more than the whole checkpoint
        stats = convert.dcp2hf(sys.argv[2], sys.argv[3], log=lambda s: None)
    print(json.dumps({"baseline": base, "peak": hwm(), "seconds": time.monotonic() - t0, **stats}))
""")


def _write_big_checkpoint(out: Path) -> int:
    """Random bf16 weights for BIG (routers and their biases fp32, as transformers stores them), written layer by
    layer (never the whole model in memory) into ~40 MB shards so layers straddle files. Returns the largest
    layer's bytes."""
    from tritonmoe.dsv3.checkpoint import build_meta_model, fp32_tensors, write_hf_checkpoint

    model = build_meta_model(BIG, DeepseekV3ForCausalLM)
    expected, fp32 = model.state_dict(), fp32_tensors(model)
    specs = {k: (tuple(t.shape), torch.float32 if k in fp32 else torch.bfloat16) for k, t in expected.items()}
    layout = hm.CheckpointLayout.from_hf_config(BIG)
    main = {}

    def make(key):
        t = (torch.randn(specs[key][0]) * 0.02).to(specs[key][1])
        if hm.ours_group_of(key, layout) is None:
            main[key] = t
        return t

    write_hf_checkpoint(out, BIG, layout, specs, make, main.__getitem__, 40 * 2**20)
    sizes = [sum(math.prod(specs[k][0]) * specs[k][1].itemsize for k in keys)
             for keys in hm.ours_groups(specs, layout).values()]
    return max(sizes)


def _measure(direction: str, src: Path, dst: Path, config: Path) -> dict:
    # A fixed mmap threshold makes glibc map and unmap every tensor of 1 MiB or more, as it does for the GB-sized
    # tensors of a real checkpoint; with its default (dynamic, up to 32 MiB) this checkpoint's 16-32 MiB tensors
    # come from a heap that keeps freed memory, and peaks varied by 0.6x a layer from run to run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, direction, str(src), str(dst), str(config)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_stays_near_one_layer_both_ways(tmp_path):
    """hf2dcp and dcp2hf (at its default 5 GB shard, above this whole checkpoint) each hold about one layer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _MEASURE
    try:
        largest = _write_big_checkpoint(tmp_path / "hf")
    finally:
        torch.set_num_threads(threads)
    total = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    assert total > 250 * 2**20 and len(list((tmp_path / "hf").glob("*.safetensors"))) > 5
    config = tmp_path / "hf" / sio.CONFIG_FILE
    for direction, src, dst in (("hf2dcp", tmp_path / "hf", tmp_path / "dcp"),
                                ("dcp2hf", tmp_path / "dcp", tmp_path / "back")):
        r = _measure(direction, src, dst, config)
        growth = r["peak"] - r["baseline"]
        rate = total / 2**20 / r["seconds"]
        print(f"\n{direction} on {total / 2**20:.0f} MiB: peak RSS growth {growth / 2**20:.0f} MiB, largest layer "
              f"{largest / 2**20:.0f} MiB ({growth / largest:.2f}x), {rate:.0f} MiB/s")
        assert growth < 2 * largest, (f"{direction}: peak RSS grew {growth / 2**20:.0f} MiB, largest layer "
                                      f"{largest / 2**20:.0f} MiB")
    assert len(list((tmp_path / "back").glob("*.safetensors"))) == 1  # one shard: the bound is not the shard size


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
    results = run_distributed(_four_ranks, 4, str(tmp_path / "dcp"), str(tmp_path / "dcp" / sio.CONFIG_FILE),
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
