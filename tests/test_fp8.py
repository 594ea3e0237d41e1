"""FP8 (E4M3, DeepSeek-V3 fine-grained scaling) kernels through Triton's interpreter against their twins, the
twins against float64, the autograd of grouped_linear_fp8, the weight cache, and the sm_90a compile.

Kernel vs twin: quantized bytes and scales exactly equal; GEMM outputs within the rounding of the output
dtype (``_assert_within_rounding``). Twin vs float64: inside the bound derived below, elementwise.

Error bound (E4M3 with 128-element tiles). E4M3 has 3 mantissa bits: round-to-nearest-even of a normal
value v (|v| >= 2^-6) moves it by at most half its spacing, 2^(e-4) <= 2^-4 |v|; subnormals are multiples
of 2^-9, so the error there is at most 2^-10. A tile with scale s = amax / 448 quantizes v as
q = RNE(fl(v / s)) (|v / s| <= 448, so nothing saturates) and represents s * q, hence per element

    |s q - v| <= eps |v| + 2^-10 s,   eps = 2^-4 + 2^-23   (the 2^-23 covers the rounding of v / s).

A GEMM of quantized operands then differs from the exact product y = sum_d x_d w_d by at most

    sum_d (e_x |w| + |x| e_w + e_x e_w) + gamma(nb + 128) sum_d |x^ w^| + r |y~|

with e_x, e_w the per-element bounds above, x^ = s q the represented values, gamma(n) = n u / (1 - n u),
u = 2^-24 (a 128-term fp32 partial, two scale products and nb = cdiv(D, 128) accumulations), and
r = 2^-8 / (1 - 2^-8) for a bf16 output y~ (0 for fp32). The weight gradient's X is quantized twice (rows in
the forward, then columns from those dequantized rows): its e_x is the sum of both stages' bounds plus the
fp32 rounding of the dequantization. In words: at most ~2 x 6.25% of sum |x||w| per output, plus the
subnormal floor 2^-10 s per element; the measured errors are far smaller (random-signed rounding).
"""

import re

import pytest
import torch
import torch.utils.checkpoint

from helpers import assert_close, poison_
from tritonmoe.kernels import fp8 as F
from tritonmoe.kernels._backend import force_twins
from tritonmoe.kernels import route

triton = pytest.importorskip("triton")
tl = triton.language
from tritonmoe.kernels._fp8_kernels import from_e4m3, to_e4m3  # noqa: E402

# Non-finite inputs are part of the cases: the interpreter's numpy says so when it divides by NaN or inf.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

U32 = 2.0**-24
EPS = 2.0**-4 + 2.0**-23
SUB = 2.0**-10


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _bytes_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Exact equality of e4m3 tensors; NaN codes compared by position (0x7F and 0xFF are both NaN, and the
    sign of a NaN made by 0/0 or x/NaN is not specified)."""
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape == b.shape, what
    af, bf = a.float(), b.float()
    assert torch.equal(af.isnan(), bf.isnan()), f"{what}: NaN positions differ"
    keep = ~af.isnan()
    assert torch.equal(a.view(torch.uint8)[keep], b.view(torch.uint8)[keep]), (
        f"{what}: {(a.view(torch.uint8)[keep] != b.view(torch.uint8)[keep]).sum()} bytes differ")


def _scales_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, what
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)


def _assert_within_rounding(actual: torch.Tensor, expected: torch.Tensor, mag: torch.Tensor, steps: int,
                            what: str) -> None:
    """|actual - expected| <= (output rounding of both) + 2 gamma(steps) mag, elementwise: the kernel and the
    twin sum the same exact fp32 products in different orders (mag = sum of |products| behind each output),
    then each rounds once to the output dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    r = 2.0**-8 if actual.dtype == torch.bfloat16 else 0.0
    tol = r * (a.abs() + e.abs()) + 2 * _gamma(steps) * mag
    bad = (a - e).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements outside rounding, worst {(a - e).abs()[bad].max()}"


def _deq_rows(q, s):
    return q.double() * s.double().repeat_interleave(128, 1)[:, :q.shape[1]]


def _deq_blocks(q, s):
    s = s.double().repeat_interleave(128, -2).repeat_interleave(128, -1)
    return q.double() * s[..., :q.shape[-2], :q.shape[-1]]


def _per_group(a, b, sizes):
    """[M, N] = a[rows of g] @ b[g].T for float64 operands (a [M, D], b [G, N, D])."""
    return torch.cat([ag @ bg.T for ag, bg in zip(torch.split(a, sizes.tolist()), b)] or [a.new_empty(0, b.shape[1])])


def _wgrad_ref(dy, x, sizes):
    return torch.stack([d.T @ xx for d, xx in zip(torch.split(dy, sizes.tolist()), torch.split(x, sizes.tolist()))])


# ------------------------------------------------------------------------------------ e4m3 conversions

@triton.jit
def _roundtrip_kernel(x_ptr, q_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    q = to_e4m3(tl.load(x_ptr + offs, mask=mask), True)
    tl.store(q_ptr + offs, q, mask=mask)
    tl.store(y_ptr + offs, from_e4m3(q, True), mask=mask)


def test_interpreter_e4m3_conversions_match_torch():
    # The interpreter's own casts round ties away from even and turn NaN into numbers; the bit-level helpers
    # must give torch's (and cvt.rn.satfinite's) bytes on every e4m3 value, every midpoint (ties: even
    # mantissa wins) and its neighbours, subnormals, overflow (saturates to 448), +-inf and NaN.
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    fin = codes[codes.isfinite()].unique()
    mids = (fin[1:] + fin[:-1]) / 2
    x = torch.cat([fin, mids, mids * (1 - 2**-20), mids * (1 + 2**-20), torch.randn(2000) * 50,
                   torch.rand(200) * 2**-6, torch.tensor([449.0, 463.9, 464.0, 479.0, 1e30, float("inf"),
                                                          -float("inf"), float("nan"), -0.0, 1e-40])])
    q = poison_(torch.empty(x.shape, dtype=torch.float8_e4m3fn).view(torch.uint8)).view(torch.float8_e4m3fn)
    y = poison_(torch.empty_like(x))
    _roundtrip_kernel[(1,)](x, q, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    _bytes_equal(q, x.to(torch.float8_e4m3fn), "to_e4m3")
    torch.testing.assert_close(y, q.float(), rtol=0, atol=0, equal_nan=True)  # decoding, NaN included


# ----------------------------------------------------------------------------------------- quantizers

def _special_rows(M, D, dtype):
    """Random rows with one tile of each special kind: all zeros, a NaN, an inf, values spanning 2^-16 of
    the tile's amax (subnormals after scaling), and a -0."""
    x = torch.randn(M, D) * 3
    x[0, :128] = 0
    x[1, 130] = float("nan")
    x[2, -1] = float("inf")
    x[3, :128] = torch.randn(128) * 2.0**-16
    x[3, 5] = 1.0
    x[4, 0] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("M,D,transposed", [
    pytest.param(37, 300, False, id="ragged"),  # D = 2*128 + 44 (partial last tile), M not a multiple of 64
    pytest.param(6, 256, True, id="strided"),  # x a transposed view: stride along D is M, not 1
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_quantize_rows_matches_twin(M, D, transposed, dtype):
    x = _special_rows(M, D, dtype)
    if transposed:
        x = x.t().contiguous().t()
    q, s = F.quantize_fp8_rows(x, 128)
    qt, st = F.quantize_fp8_rows_torch(x, 128)
    _bytes_equal(q, qt, "x_fp8")
    _scales_equal(s, st, "scale")
    assert s.shape == (M, -(-D // 128))
    assert s[0, 0] == 1 and torch.equal(q[0, :128].float(), torch.zeros(128)), "all-zero tile: scale 1, zeros"
    assert s[1, 1].isnan() and q[1, 128:256].float().isnan().all(), "a NaN poisons its tile"
    assert s[2, -1].isinf() and q[2, -1].float().isnan(), "an inf makes its tile's scale inf and itself NaN"
    codes = q[3, :128].view(torch.uint8)
    assert ((codes & 0x78 == 0) & (codes & 7 != 0)).any(), "row 3 must exercise e4m3 subnormals"
    fin = torch.tensor([[torch.isfinite(x[m, b * 128:(b + 1) * 128].float()).all() for b in range(s.shape[1])]
                        for m in range(M)])
    assert torch.isfinite(s[fin]).all() and (s[fin] > 0).all(), "finite tiles get finite, non-zero scales"


def test_quantize_blocks_matches_twin():
    # N = 200 and D = 300 leave partial blocks along both; block (0, 0) is all zeros, (1, 1) holds a NaN,
    # (2, 0, 2) an inf. The 2-D form and quantize_fp8_weight's transposed copy come from the same pass.
    w = torch.randn(3, 200, 300).bfloat16()
    w[0, :128, :128] = 0
    w[1, 150, 200] = float("nan")
    w[2, 10, 299] = float("inf")
    q, s = F.quantize_fp8_blocks(w, 128)
    qt, st = F.quantize_fp8_blocks_torch(w, 128)
    _bytes_equal(q, qt, "w_fp8")
    _scales_equal(s, st, "scale")
    assert s.shape == (3, 2, 3) and s[0, 0, 0] == 1 and s[1, 1, 1].isnan() and s[2, 0, 2].isinf()
    assert torch.isfinite(s[0]).all() and (s[0] > 0).all()
    q2, s2 = F.quantize_fp8_blocks(w[0], 128)
    _bytes_equal(q2, qt[0], "2-D w_fp8")
    _scales_equal(s2, st[0], "2-D scale")
    wq = F.quantize_fp8_weight(w)
    _bytes_equal(wq.fp8, qt, "weight fp8")
    _bytes_equal(wq.fp8_t, qt.transpose(1, 2).contiguous(), "weight fp8 transposed")
    assert wq.fp8_t.is_contiguous()


COL_SIZES = [0, 130, 5, 0, 1]  # empty first and middle, a group of 130 rows (two tiles), 1-row last group


@pytest.mark.parametrize("source", [
    "bf16-rows-cols",  # dY: the backward's one-pass rows (dgrad) + column tiles (wgrad)
    "fp8-gather",  # X: the forward's saved e4m3 rows, dequantized, gathered through src_rows, re-tiled
])
def test_quantize_cols_matches_twin(source):
    sizes = torch.tensor(COL_SIZES)
    M, C, G = int(sizes.sum()), 140, len(COL_SIZES)  # C = 128 + 12: partial column block
    tiles = -(-M // 128) + G
    if source == "bf16-rows-cols":
        x = (torch.randn(M, C) * 2).bfloat16()
        x[:128, 3] = 0  # column 3 of group 1's first tile (rows 0-127) all zeros: scale 1
        x[129, 7] = float("nan")  # group 1's second tile (rows 128-129), column 7
        qr, sr, q, s = F._quantize_rows_cols_op(x, sizes)
        qr_t, sr_t = F.quantize_fp8_rows_torch(x)
        _bytes_equal(qr, qr_t, "rows")
        _scales_equal(sr, sr_t, "row scales")
        qt, st = F.quantize_fp8_cols_torch(x, sizes)
        q2, s2 = F.quantize_fp8_cols(x, sizes, 128)  # the cols-only kernel path of the same op family
        _bytes_equal(q2, qt, "cols-only")
        _scales_equal(s2, st, "cols-only scales")
        assert s[0, 3] == 1 and s[1, 7].isnan() and torch.isfinite(s[1, :7]).all()
    else:
        xs_q, xs_s = F.quantize_fp8_rows(torch.randn(50, C))
        rows = torch.randint(0, 50, (M,))  # repeats and gaps, like top-k routing
        q, s = F.quantize_fp8_cols(xs_q, sizes, 128, x_scale=xs_s, src_rows=rows)
        qt, st = F.quantize_fp8_cols_torch(xs_q, sizes, x_scale=xs_s, src_rows=rows)
    assert q.shape == (C, 128 * tiles) and s.shape == (tiles, C)
    _bytes_equal(q, qt, "column tiles")
    _scales_equal(s, st, "column scales")
    # Layout: row m at column col_positions[m] (group 1: 0-129, group 2: tile 2 from 256, group 4: tile 3),
    # every other column zero; scales past the 4 real tiles are 1.
    pos = F.col_positions(sizes, M)
    assert pos[129].item() == 129 and pos[130].item() == 256 and pos[135].item() == 384
    unused = torch.ones(128 * tiles, dtype=torch.bool)
    unused[pos] = False
    assert torch.equal(q.float()[:, unused], torch.zeros(C, int(unused.sum())))
    assert torch.equal(s[4:], torch.ones(tiles - 4, C))


# --------------------------------------------------------------------------------------------- GEMMs

GEMM_SIZES = [0, 37, 130, 0, 5]  # empty first and middle; a group > 128 rows and > the 32-row interpreter tile


def _gemm_inputs(D=300, N=200, S=None):
    """Operands for a grouped FP8 GEMM: D = 2*128 + 44 and N = 128 + 72 leave partial blocks."""
    sizes = torch.tensor(GEMM_SIZES)
    M, G = int(sizes.sum()), len(GEMM_SIZES)
    x = torch.randn(S or M, D)
    w = torch.randn(G, N, D) / D**0.5
    return sizes, F.quantize_fp8_rows_torch(x), F.quantize_fp8_blocks_torch(w)


def _mag_fwd(xq, xs, wq, ws, sizes, rows=None):
    a = _deq_rows(xq, xs).abs()
    return _per_group(a if rows is None else a[rows], _deq_blocks(wq, ws).abs(), sizes)


@pytest.mark.parametrize("case", [
    "fwd",  # x [M, D] rows sorted by group, bf16 out
    "fwd-gather",  # rows read through src_rows (repeats), the permute fused into the first GEMM
    "fwd-fp32-out",  # fp32 out: only the fp32 summation order may differ
])
def test_grouped_gemm_fp8_matches_twin(case):
    S = 50 if case == "fwd-gather" else None
    sizes, (xq, xs), (wq, ws) = _gemm_inputs(S=S)
    M = int(sizes.sum())
    rows = torch.randint(0, S, (M,)) if S else None
    out_dtype = torch.float32 if case == "fwd-fp32-out" else torch.bfloat16
    out = poison_(torch.empty(M, wq.shape[1], dtype=out_dtype))
    y = F._gemm_fp8_launch(xq, xs, wq, ws, sizes, out_dtype, a_rows=rows, out=out)
    y_twin = F.grouped_gemm_fp8_torch(xq, xs, wq, ws, sizes, src_rows=rows, out_dtype=out_dtype)
    _assert_within_rounding(y, y_twin, _mag_fwd(xq, xs, wq, ws, sizes, rows), 128 + 3, case)
    assert torch.equal(F.grouped_gemm_fp8(xq, xs, wq, ws, sizes, src_rows=rows, out_dtype=out_dtype), y)


@pytest.mark.parametrize("layout", [
    "transposed-copy",  # the autograd path: quantize_fp8_weight's K-major copy + transposed scales
    "strides",  # w_fp8.transpose(1, 2) read through strides (no copy)
])
def test_grouped_gemm_fp8_dgrad_matches_twin(layout):
    sizes, _, (wq, ws) = _gemm_inputs()
    M, N = int(sizes.sum()), wq.shape[1]
    dyq, dys = F.quantize_fp8_rows_torch(torch.randn(M, N))  # dY in 1 x 128 tiles along N
    b = wq.transpose(1, 2).contiguous() if layout == "transposed-copy" else wq.transpose(1, 2)
    dx = F._gemm_fp8_launch(dyq, dys, b, ws.transpose(1, 2), sizes, torch.bfloat16,
                            out=poison_(torch.empty(M, wq.shape[2], dtype=torch.bfloat16)))
    dx_twin = F.grouped_gemm_fp8_torch(dyq, dys, wq.transpose(1, 2), ws.transpose(1, 2), sizes)
    mag = _per_group(_deq_rows(dyq, dys).abs(), _deq_blocks(wq, ws).abs().transpose(1, 2), sizes)
    _assert_within_rounding(dx, dx_twin, mag, 128 + 2, f"dgrad {layout}")


def test_grouped_gemm_fp8_wgrad_matches_twin():
    # Rows 37 / 130 / 5 in group-aligned tiles (130 = one full tile + 2); the empty groups get exact zeros.
    sizes = torch.tensor(GEMM_SIZES)
    M, G, N, D = int(sizes.sum()), len(GEMM_SIZES), 72, 140
    dy, x = torch.randn(M, N).bfloat16(), torch.randn(M, D)
    dyq, dys = F.quantize_fp8_cols_torch(dy, sizes)
    xq, xs = F.quantize_fp8_cols_torch(x, sizes)
    dw = F._gemm_fp8_wgrad_launch(dyq, dys, xq, xs, sizes, torch.float32, out=poison_(torch.empty(G, N, D)))
    dw_twin = F.grouped_gemm_fp8_wgrad_torch(dyq, dys, xq, xs, sizes)
    pos = F.col_positions(sizes, M)
    dy_deq = (dyq.double() * dys.double().repeat_interleave(128, 0).T)[:, pos].T
    x_deq = (xq.double() * xs.double().repeat_interleave(128, 0).T)[:, pos].T
    _assert_within_rounding(dw, dw_twin, _wgrad_ref(dy_deq.abs(), x_deq.abs(), sizes), 128 + 4, "wgrad")
    assert torch.equal(dw[sizes == 0], torch.zeros(2, N, D)), "empty groups must get exact zero dW"
    dw16 = F.grouped_gemm_fp8_wgrad(dyq, dys, xq, xs, sizes, out_dtype=torch.bfloat16)
    _assert_within_rounding(dw16, dw_twin.bfloat16(), _wgrad_ref(dy_deq.abs(), x_deq.abs(), sizes), 128 + 4,
                            "wgrad bf16")


def test_pinned_config(monkeypatch):
    # BN = 128: one weight block row per tile exactly (the Hopper configs' case, the interpreter default is
    # 32); BM = 64 > the 37- and 5-row groups, so most tiles are mostly masked.
    monkeypatch.setenv(F.CONFIG_ENV, "64,128,4,1")
    sizes, (xq, xs), (wq, ws) = _gemm_inputs(D=200, N=256)
    y = F._gemm_fp8_launch(xq, xs, wq, ws, sizes, torch.bfloat16)
    _assert_within_rounding(y, F.grouped_gemm_fp8_torch(xq, xs, wq, ws, sizes), _mag_fwd(xq, xs, wq, ws, sizes),
                            128 + 2, "pinned fwd")
    M = int(sizes.sum())
    dyq, dys = F.quantize_fp8_cols_torch(torch.randn(M, 256), sizes)
    xcq, xcs = F.quantize_fp8_cols_torch(torch.randn(M, 200), sizes)
    assert_close(F._gemm_fp8_wgrad_launch(dyq, dys, xcq, xcs, sizes, torch.float32),
                 F.grouped_gemm_fp8_wgrad_torch(dyq, dys, xcq, xcs, sizes), 1e-5, what="pinned wgrad")


@pytest.mark.parametrize("spec", ["64,256,8,3", "48,64,4,3", "64,64,4"])
def test_bad_pinned_config(monkeypatch, spec):
    monkeypatch.setenv(F.CONFIG_ENV, spec)  # BN past one weight block; not a power of two; three numbers
    sizes, (xq, xs), (wq, ws) = _gemm_inputs(D=16, N=8)
    with pytest.raises(ValueError, match=F.CONFIG_ENV):
        F.grouped_gemm_fp8(xq, xs, wq, ws, sizes)


def test_non_finite_inputs_propagate():
    # A NaN in one token row and an inf in one weight block: the outputs they feed are non-finite (never
    # silently finite), every other output stays finite, in the forward and the weight gradient.
    sizes = torch.tensor([6, 4])
    x, w = torch.randn(10, 130), torch.randn(2, 40, 130)
    x[2, 129] = float("nan")
    w[1, 3, 0] = float("inf")
    (xq, xs), (wq, ws) = F.quantize_fp8_rows(x), F.quantize_fp8_blocks(w)
    y = F.grouped_gemm_fp8(xq, xs, wq, ws, sizes, out_dtype=torch.float32)
    bad = torch.zeros(10, 40, dtype=torch.bool)
    bad[2] = True  # the NaN row, all columns
    bad[6:, :40] = True  # group 1 reads the inf's block (rows 0..39 of w[1]): its whole 128-row block
    assert (~torch.isfinite(y[bad])).all() and torch.isfinite(y[~bad]).all()
    dyq, dys = F.quantize_fp8_cols(torch.randn(10, 40), sizes)
    xcq, xcs = F.quantize_fp8_cols(xq, sizes, x_scale=xs)
    dw = F.grouped_gemm_fp8_wgrad(dyq, dys, xcq, xcs, sizes)
    assert (~torch.isfinite(dw[0, :, 128:])).all() and torch.isfinite(dw[0, :, :128]).all() and \
        torch.isfinite(dw[1]).all(), "only group 0's columns in the NaN's tile may be non-finite"


# --------------------------------------------------------------------------- twins against float64

def _elem_bound(v, s_full):
    return EPS * v.abs() + SUB * s_full


def _tile_scales(v, tile):
    """amax / 448 of every tile of v (shape `tile`, partial at the edges), broadcast back to v's shape:
    the scales the derivation prescribes, computed here from the inputs rather than read from the twin."""
    t = v.abs()
    for dim, b in enumerate(tile):
        if b > 1:
            n = t.shape[dim]
            pad = [0, 0] * (t.dim() - 1 - dim) + [0, -n % b]
            t = torch.nn.functional.pad(t, pad).unflatten(dim, (-1, b)).amax(dim + 1, keepdim=True)
            t = t.expand(*t.shape[:dim + 1], b, *t.shape[dim + 2:]).flatten(dim, dim + 1)[
                (slice(None),) * dim + (slice(0, n),)]
    s = t / 448
    return torch.where(s == 0, torch.ones_like(s), s)


def _group_col_scales(v, sizes):
    """The same for 128-row x 1-column tiles restarting at every group's first row."""
    return torch.cat([_tile_scales(vg, (128, 1)) for vg in torch.split(v, sizes.tolist())])


def _mixed_magnitudes(t, tile_shape):
    """Each tile scaled by its own power of two in 2^-6..2^6: a scale applied to the wrong tile, or one
    scale per tensor, would be off by up to 2^12 and fail the bound by far."""
    scales = 2.0 ** torch.randint(-6, 7, [-(-n // b) for n, b in zip(t.shape, tile_shape)]).double()
    for dim, b in enumerate(tile_shape):
        scales = scales.repeat_interleave(b, dim)
    return t * scales[tuple(slice(0, n) for n in t.shape)].to(t.dtype)


def test_twins_within_e4m3_bound_of_float64():
    sizes = torch.tensor([0, 37, 130, 0, 5])
    M, G, N, D = int(sizes.sum()), 5, 200, 300
    x = _mixed_magnitudes(torch.randn(M, D).double(), (1, 128)).float()
    w = _mixed_magnitudes(torch.randn(G, N, D).double() / D**0.5, (1, 128, 128)).float()
    dy = _mixed_magnitudes(torch.randn(M, N).double(), (1, 128)).float()
    x64, w64, dy64 = x.double(), w.double(), dy.double()

    # The per-element bound with the prescribed scales, and that it is tight: round-to-nearest comes
    # within 10% of half a spacing somewhere (a truncating cast would pass 1, a per-tensor scale too).
    xq, xs = F.quantize_fp8_rows_torch(x)
    wq, ws = F.quantize_fp8_blocks_torch(w)
    sx, sw = _tile_scales(x64, (1, 128)), _tile_scales(w64, (1, 128, 128))
    ex, ew = _elem_bound(x64, sx), _elem_bound(w64, sw)
    for deq, ref, bound in ((_deq_rows(xq, xs), x64, ex), (_deq_blocks(wq, ws), w64, ew)):
        ratio = (deq - ref).abs() / bound
        assert ratio.max() <= 1 and ratio.max() > 0.9

    def gemm_bound(a, ea, b, eb, ahat, bhat, y_twin, steps, out_rounding):
        return (_per_group(ea, b.abs(), sizes) + _per_group(a.abs(), eb, sizes) + _per_group(ea, eb, sizes)
                + _gamma(steps) * _per_group(ahat.abs(), bhat.abs(), sizes) + out_rounding * y_twin.abs())

    r16 = 2.0**-8 / (1 - 2.0**-8)
    y = F.grouped_gemm_fp8_torch(xq, xs, wq, ws, sizes).double()
    bound = gemm_bound(x64, ex, w64, ew, _deq_rows(xq, xs), _deq_blocks(wq, ws), y, 128 + 3, r16)
    assert ((y - _per_group(x64, w64, sizes)).abs() <= bound).all(), "forward outside the E4M3 bound"

    dyq, dys = F.quantize_fp8_rows_torch(dy)
    edy = _elem_bound(dy64, _tile_scales(dy64, (1, 128)))
    dx = F.grouped_gemm_fp8_torch(dyq, dys, wq.transpose(1, 2), ws.transpose(1, 2), sizes).double()
    wt, ewt, wt_hat = w64.transpose(1, 2), ew.transpose(1, 2), _deq_blocks(wq, ws).transpose(1, 2)
    bound = gemm_bound(dy64, edy, wt, ewt, _deq_rows(dyq, dys), wt_hat, dx, 128 + 2, r16)
    assert ((dx - _per_group(dy64, wt, sizes)).abs() <= bound).all(), "input gradient outside the E4M3 bound"

    # Weight gradient: dY in column tiles; X's saved rows (xq, xs) dequantized in fp32 and re-tiled, so
    # its bound adds the second quantization (of the dequantized rows x_row) to the first.
    pos = F.col_positions(sizes, M)
    dycq, dycs = F.quantize_fp8_cols_torch(dy, sizes)
    xcq, xcs = F.quantize_fp8_cols_torch(xq, sizes, x_scale=xs)

    def col_deq(q, s):
        return (q.double() * s.double().repeat_interleave(128, 0).T)[:, pos].T

    x_row = _deq_rows(xq, xs)
    ex2 = ex + (EPS + 2 * U32) * x_row.abs() + SUB * _group_col_scales(x_row, sizes)
    edy2 = _elem_bound(dy64, _group_col_scales(dy64, sizes))
    dw = F.grouped_gemm_fp8_wgrad_torch(dycq, dycs, xcq, xcs, sizes).double()
    bound = (_wgrad_ref(edy2, x64.abs(), sizes) + _wgrad_ref(dy64.abs(), ex2, sizes) + _wgrad_ref(edy2, ex2, sizes)
             + _gamma(128 + 4) * _wgrad_ref(col_deq(dycq, dycs).abs(), col_deq(xcq, xcs).abs(), sizes))
    assert ((dw - _wgrad_ref(dy64, x64, sizes)).abs() <= bound).all(), "weight gradient outside the E4M3 bound"
    # The twin's scales are the prescribed ones (fp32 division of the same amax).
    assert torch.equal(xs.double().repeat_interleave(128, 1)[:, :D], sx.float().double())


# ---------------------------------------------------------------------------------------------- autograd

def _routing(T, K, E):
    return torch.rand(T, E).topk(K, dim=1).indices


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "sorted-rows"])
def test_grouped_linear_fp8_matches_twin(gather):
    # gather: bf16 token rows through permute's routing (T=40, top-2 of 3 experts, so groups of ~27 rows);
    # sorted-rows: fp32 x already in expert order with an empty expert. fp32 master weight either way.
    torch.manual_seed(1)
    if gather:
        topk_idx = _routing(40, 2, 3)
        sizes, src = route(topk_idx, 3)
        src_rows, row_map = src.index, src.inverse
        x0 = torch.randn(40, 200).bfloat16()
    else:
        sizes, row_map, src_rows = torch.tensor([20, 0, 33]), None, None
        x0 = torch.randn(53, 200)
    w0 = torch.randn(3, 136, 200) / 200**0.5
    dy = torch.randn(int(sizes.sum()), 136).to(x0.dtype)
    x1, w1 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    x2, w2 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y1 = F.grouped_linear_fp8(x1, w1, sizes, src_rows, row_map)
    y2 = F.grouped_linear_fp8_torch(x2, w2, sizes, src_rows, row_map)
    y1.backward(dy)
    y2.backward(dy)
    assert y1.dtype == x0.dtype and x1.grad.dtype == x0.dtype and w1.grad.dtype == torch.float32
    # Same quantization bytes on both sides, so only the fp32 summation order and one rounding differ.
    assert_close(y1, y2, 2.0**-7, 2.0**-9, what="y")
    assert_close(x1.grad, x2.grad, 2.0**-6, 2.0**-8, what="dX")  # gather: two copies summed, each rounded
    assert_close(w1.grad, w2.grad, 1e-5, what="dW")
    assert torch.equal(w1.grad[sizes == 0], torch.zeros_like(w1.grad[sizes == 0]))
    # What autograd keeps: x in FP8 with its scales and the weight's FP8 copy, never the high-precision x.
    assert any(t.dtype == torch.float8_e4m3fn and t.shape == x0.shape for t in saved)
    assert not any(t.dtype == x0.dtype and t.shape == x0.shape for t in saved)
    assert w0.equal(w1.detach()), "master weight untouched"


def test_grouped_linear_fp8_twin_backend_is_the_twin():
    # CPU without the interpreter (force_twins): the same ops run their twin bodies and give exactly the
    # standalone twin's forward and gradients; no kernel is launched.
    sizes, x0, w0 = torch.tensor([5, 0, 9]), torch.randn(14, 130), torch.randn(3, 20, 130)
    x1, w1 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    x2, w2 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with force_twins():
        y1 = F.grouped_linear_fp8(x1, w1, sizes)
        y1.sum().backward()
    y2 = F.grouped_linear_fp8_torch(x2, w2, sizes)
    y2.sum().backward()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad) and torch.equal(w1.grad, w2.grad)


def test_weight_cache_quantizes_once_per_step(monkeypatch):
    # Two micro-batches and an activation-checkpointing recompute inside one step quantize the weight once;
    # an in-place update inside the step, a new tensor object, or a new step quantize again; outside a
    # step block nothing is kept. (Twins: the cache logic is the same on every backend.)
    calls = []
    real = F._quantize_weight_op
    monkeypatch.setattr(F, "_quantize_weight_op", lambda w: calls.append(1) or real(w))
    sizes = torch.tensor([3, 4])
    w = torch.randn(2, 16, 32, requires_grad=True)
    cache = F.Fp8WeightCache()

    def layer(x):
        return F.grouped_linear_fp8(x, w, sizes, weight_cache=cache)

    with force_twins():
        with cache.step():
            for _ in range(2):
                x = torch.randn(7, 32, requires_grad=True)
                torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
            assert len(calls) == 1 and cache.misses == 1 and cache.hits == 3  # 2 forwards + 1 recompute each
            first = cache.get(w)
            assert cache.get(w) is first
            with torch.no_grad():
                w.add_(1.0)  # version bump: a changed weight is never served from the cache
            assert cache.get(w) is not first and len(calls) == 2
            w2 = w.detach().clone()
            cache.get(w2)
            assert len(calls) == 3
            # Fresh views of one tensor (what DTensor.to_local() returns each call) share its entry; a view
            # of another part of it does not.
            base = torch.randn(4, 16, 32)
            cache.get(base.view(4, 16, 32))
            cache.get(base.view(4, 16, 32))
            assert len(calls) == 4
            cache.get(base[2:])
            assert len(calls) == 5
            with pytest.raises(RuntimeError, match="do not nest"):
                with cache.step():
                    pass
        assert cache._entries == {}, "a step's entries are dropped when it ends"
        cache.get(w)
        cache.get(w)
        assert len(calls) == 7 and cache.misses == 5, "outside a step block every call quantizes"
        with cache.step():
            cache.get(w)
        assert len(calls) == 8


def test_torch_library_registration():
    # Fake (meta) kernels, autograd registration and AOT dispatch as torch.compile uses them; tiny shapes,
    # since opcheck runs each op several times. Its schema check multiplies the inputs to detect mutation,
    # which CPU torch cannot do on e4m3 tensors: ops with e4m3 inputs are checked for mutation by bytes.
    T, K, E, D, N = 6, 2, 3, 16, 8
    sizes, routed = route(_routing(T, K, E), E)
    src, row_map = routed.index, routed.inverse
    x, w = torch.randn(T, D, requires_grad=True), torch.randn(E, N, D, requires_grad=True)
    dy = torch.randn(T * K, N)
    xq, xs = F.quantize_fp8_rows(x)
    wq = F.quantize_fp8_weight(w)
    dyq, dys = F.quantize_fp8_cols(dy, sizes)
    xcq, xcs = F.quantize_fp8_cols(xq, sizes, x_scale=xs, src_rows=src)
    float_inputs = [(F._quantize_rows_op, (x.detach(),)), (F._quantize_weight_op, (w.detach(),)),
                    (F._quantize_blocks_op, (w.detach(),)), (F._quantize_rows_cols_op, (dy, sizes))]
    fp8_inputs = [(F._grouped_linear_fp8_op, (x, xq, xs, w, wq.fp8, wq.scale, wq.fp8_t, sizes, src, row_map)),
                  (F._grouped_mm_fp8_op, (xq, xs, wq.fp8, wq.scale, sizes, src, torch.bfloat16)),
                  (F._quantize_cols_op, (xq, sizes, xs, src)),
                  (F._grouped_mm_fp8_wgrad_op, (dyq, dys, xcq, xcs, sizes, torch.float32))]
    for op, args in float_inputs:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    for op, args in fp8_inputs:
        before = [a.detach().view(torch.uint8).clone() if a.dtype == torch.float8_e4m3fn else a.detach().clone()
                  for a in args if isinstance(a, torch.Tensor)]
        torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_autograd_registration",
                                                    "test_aot_dispatch_dynamic"))
        after = [a.detach().view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a.detach()
                 for a in args if isinstance(a, torch.Tensor)]
        assert all(torch.equal(u, v) for u, v in zip(before, after)), f"{op} mutated an input"


def test_compiles_fullgraph():
    # The layer with permute's routing traces as one graph (the cache lookup steps aside while compiling).
    T, K, E, D, N = 12, 2, 3, 32, 16
    topk_idx = _routing(T, K, E)
    x, w = torch.randn(T, D, requires_grad=True), torch.randn(E, N, D, requires_grad=True)
    cache = F.Fp8WeightCache()

    def f(x, w, topk_idx):
        sizes, src = route(topk_idx, E)
        return F.grouped_linear_fp8(x, w, sizes, src.index, src.inverse, weight_cache=cache)

    with force_twins(), cache.step():
        y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, topk_idx)
        y.sum().backward()
        sizes, src = route(topk_idx, E)
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y2 = F.grouped_linear_fp8_torch(x2, w2, sizes, src.index, src.inverse)
        y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


_XQ, _XS = F.quantize_fp8_rows_torch(torch.randn(6, 130))
_WQ, _WS = F.quantize_fp8_blocks_torch(torch.randn(2, 8, 130))
_S = torch.tensor([2, 4])
BAD_INPUTS = [
    pytest.param(lambda: F.quantize_fp8_rows(torch.randn(4, 8), 64), r"block=64 unsupported", id="block"),
    pytest.param(lambda: F.quantize_fp8_rows(torch.randn(4, 8).double()), r"x.dtype=torch.float64", id="dtype"),
    pytest.param(lambda: F.grouped_gemm_fp8(_XQ, _XS[:, :1], _WQ, _WS, _S), r"x_scale has shape \(6, 1\), "
                 r"expected \(6, 2\)", id="scale-shape"),
    pytest.param(lambda: F.grouped_gemm_fp8(_XQ.float(), _XS, _WQ, _WS, _S), r"x_fp8.dtype=torch.float32",
                 id="not-fp8"),
    pytest.param(lambda: F.grouped_gemm_fp8(_XQ[:, :64], _XS, _WQ, _WS, _S), r"w_fp8.shape\[2\]=130 != "
                 r"x_fp8.shape\[1\]=64", id="D-mismatch"),
    pytest.param(lambda: F.grouped_gemm_fp8(_XQ, _XS, _WQ, _WS, torch.tensor([7, -1])), r"negative group sizes",
                 id="negative"),
    pytest.param(lambda: F.grouped_gemm_fp8(_XQ, _XS, _WQ, _WS, torch.tensor([2, 3])), r"sum to 5, but there are "
                 r"M=6", id="sum"),
    pytest.param(lambda: F.grouped_gemm_fp8(_XQ, _XS, _WQ, _WS, _S, src_rows=torch.tensor([0, 1, 2, 3, 4, 6])),
                 r"src_rows holds 6, outside \[0, 6\)", id="src-rows"),
    pytest.param(lambda: F.grouped_gemm_fp8_wgrad(*F.quantize_fp8_cols_torch(torch.randn(6, 8), _S),
                                                  *F.quantize_fp8_cols_torch(torch.randn(6, 4), _S),
                                                  torch.tensor([400, 0])),
                 r"need 4 column tiles, the operands hold 3", id="wgrad-tiles"),
    pytest.param(lambda: F.grouped_linear_fp8(torch.randn(6, 130), torch.randn(2, 8, 130), _S,
                                              src_rows=torch.arange(6)), r"src_rows and row_map come together",
                 id="gather-pair"),
]


@pytest.mark.parametrize("call,msg", BAD_INPUTS)
def test_value_errors(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


# ---------------------------------------------------------------------------------------- sm_90a compile

@pytest.fixture(scope="module")
def sm90_reports():
    from tritonmoe.kernels._sm90 import compile_sm90_all

    from tritonmoe.kernels._sm90_jobs import fp8_jobs

    jobs = fp8_jobs()
    reports = compile_sm90_all([job for _, _, job in jobs])  # one call: child processes are slow to start
    rows = []
    for (layout, cfg, _), rep in zip(jobs, reports):
        qgmma = len(re.findall(r"\bQGMMA\.\w+\.F32\.E4M3\.E4M3\b", rep.sass))
        rows.append((layout, cfg, rep, qgmma))
    print("\n| pass | BM | BN | warps | stages | registers | spill bytes | LDL/STL | QGMMA (e4m3) | smem KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layout, cfg, rep, qgmma in rows:
        print(f"| {layout} | {cfg.block_m} | {cfg.block_n} | {cfg.num_warps} | {cfg.num_stages} | {rep.registers} | "
              f"{rep.spill_bytes} | {rep.local_ops} | {qgmma} | {rep.shared_bytes / 1024:.0f} |")
    return rows


def test_sm90_fp8_kernels_compile_to_e4m3_wgmma_without_spills(sm90_reports):
    from tritonmoe.kernels._sm90 import SM90_SMEM_LIMIT

    layouts = {layout for layout, _, _, _ in sm90_reports}
    assert {"fwd", "fwd-gather", "dgrad", "dgrad-strided", "wgrad", "quant-rows", "quant-blocks", "quant-cols-dy",
            "quant-cols-x"} <= layouts
    for layout, cfg, rep, qgmma in sm90_reports:
        where = f"{layout} {cfg}"
        assert rep.spill_bytes == 0 and rep.local_ops == 0, f"{where}: {rep.spill_bytes} B spilled"
        assert rep.shared_bytes <= SM90_SMEM_LIMIT, f"{where}: {rep.shared_bytes} B shared"
        assert ".target sm_90a" in rep.ptx
        if layout.startswith("quant"):
            # The rounding the twins reproduce: correctly rounded division, RNE + saturating e4m3 cast.
            assert "div.rn.f32" in rep.ptx and "cvt.rn.satfinite.e4m3x2.f32" in rep.ptx, where
        else:
            # wgmma on e4m3 operands (SASS QGMMA, the fp8 form of HGMMA), fed by asynchronous copies.
            assert qgmma > 0 and re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3",
                                           rep.ptx), f"{where}: no e4m3 wgmma"
            assert "cp.async" in rep.ptx, f"{where}: operand loads are not cp.async"

