"""Training the `tiny` preset byte-level on a stdlib source file: both the next-token loss and the MTP loss
must fall far below their start (ln 256 = 5.55 nats), with the aux-loss-free bias updated every step."""

import textwrap

import torch

from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, update_expert_bias
from tritonmoe.dsv3.moe import routers


def test_tiny_lm_and_mtp_losses_fall(twins):
    # Optimization is under test, not the kernels: the twins take ~0.05 s a step here, interpreted Triton
    # ~1 s a launch (18 launches a step).  test_model/test_moe run the real kernels against transformers.
    with open(textwrap.__file__, "rb") as f:  # ~20 kB of Python, always present
        data = torch.tensor(list(f.read()), dtype=torch.long)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    B, S, steps = 8, 64, 300
    lm, mtp = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only add contention on CI's 2 shared cores
    try:
        _train(model, opt, data, g, B, S, steps, lm, mtp)
    finally:
        torch.set_num_threads(threads)
    first_lm, first_mtp = lm[0], mtp[0]
    last_lm, last_mtp = sum(lm[-20:]) / 20, sum(mtp[-20:]) / 20
    assert first_lm > 5.0 and first_mtp > 5.0  # starts near uniform over 256 bytes
    # The byte unigram entropy of this file is ~3.0 nats: these thresholds need context, not just counts.
    assert last_lm < 2.7, (first_lm, last_lm)
    assert last_mtp < 2.9, (first_mtp, last_mtp)
    assert all(r.e_score_correction_bias.abs().max() > 0 for r in routers(model))


def _train(model, opt, data, g, B, S, steps, lm, mtp):
    for _ in range(steps):
        starts = torch.randint(0, len(data) - S, (B,), generator=g)
        ids = torch.stack([data[s:s + S] for s in starts])
        out = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        update_expert_bias(model)
        lm.append(out.lm_loss.item())
        mtp.append(out.mtp_loss.item())
