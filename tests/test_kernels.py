"""Decode attention over packed KIVI storage (kvpress_lite.kernels).

* the torch reference against a dense dequantize + SDPA / eager computation;
* the op's validation, dispatch and fake (meta) implementation;
* the Triton kernel against the reference on CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before
  triton is imported, so those cases run in one subprocess: `python tests/test_kernels.py --interpret`);
* the Triton kernel at real shapes on a GPU (skipped without CUDA);
* valid-length mode (`lengths`: capacity buffers with garbage past the valid tokens) against the compact call, in
  all three places, plus torch.compile without recompiles as the lengths change.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from interpreted import interpreted_json

from kvpress_lite.kernels import dequantize_history, quantized_decode_attention

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(b, hkv, gq, nq, d, t, r, bits, group_size, key_mode, dtype=torch.bfloat16, seed=0, device="cpu"):
    """Random packed storage (codes, positive scales, zeros), residual and queries; keyword arguments of the op."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qmax = (1 << bits) - 1

    def rand(*shape, lo=0.0, hi=1.0):
        return (torch.rand(*shape, generator=g) * (hi - lo) + lo).to(dtype).to(device)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    per_channel = key_mode == "channel"
    key_param = (b, hkv, t // group_size, d) if per_channel else (b, hkv, t, d // group_size)
    token_param = (b, hkv, t, d // group_size)
    db = d * bits // 8
    hist = t > 0
    return dict(
        query=randn(b, hkv * gq, nq, d),
        key_codes=torch.randint(0, 256, (b, hkv, t, db), generator=g, dtype=torch.uint8).to(device) if hist else None,
        key_scale=rand(*key_param, lo=0.2 / qmax, hi=3.0 / qmax) if hist else None,
        key_zero=(randn(*key_param) - 1) if hist else None,
        value_codes=torch.randint(0, 256, (b, hkv, t, db), generator=g, dtype=torch.uint8).to(device) if hist else None,
        value_scale=rand(*token_param, lo=0.2 / qmax, hi=3.0 / qmax) if hist else None,
        value_zero=(randn(*token_param) - 1) if hist else None,
        residual_keys=randn(b, hkv, r, d) if r else None,
        residual_values=randn(b, hkv, r, d) if r else None,
        bits=bits, group_size=group_size, key_mode=key_mode, scaling=d ** -0.5,
    )


HIST_NAMES = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")


def valid_length_inputs(b, hkv, gq, nq, d, t_cap, t_valid, r_cap, r_valid, bits, group_size, key_mode,
                        dtype=torch.bfloat16, seed=0, device="cpu"):
    """(capacity inputs with garbage past the valid tokens, lengths `(2,)`, compact inputs of the valid tokens).

    Garbage: random code bytes, NaN scales and residual keys, inf zeros and residual values (read into the result,
    any of it would show)."""
    full = make_inputs(b, hkv, gq, nq, d, t_cap, r_cap, bits, group_size, key_mode, dtype=dtype, seed=seed,
                       device=device)
    g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    cap = dict(full)
    for name in HIST_NAMES + ("residual_keys", "residual_values"):
        x = full[name]
        if x is None:
            continue
        valid = t_valid if name in HIST_NAMES else r_valid
        n = valid // group_size if name in ("key_scale", "key_zero") and key_mode == "channel" else valid
        buf = x.clone()
        if x.dtype == torch.uint8:
            buf[:, :, n:] = torch.randint(0, 256, buf[:, :, n:].shape, generator=g, dtype=torch.uint8).to(device)
        else:
            buf[:, :, n:] = float("nan") if "scale" in name or name == "residual_keys" else float("inf")
        cap[name] = buf
    return cap, torch.tensor([t_valid, r_valid], device=device), compact_inputs(full, t_valid, r_valid)


def compact_inputs(inp, t_valid, r_valid):
    """The op's keyword arguments over the first t_valid history and r_valid residual tokens of `inp` (channel keys:
    t_valid a multiple of G); None for an empty part."""
    out = dict(inp)
    for name in HIST_NAMES + ("residual_keys", "residual_values"):
        valid = t_valid if name in HIST_NAMES else r_valid
        n = valid // inp["group_size"] if name in ("key_scale", "key_zero") and inp["key_mode"] == "channel" else valid
        out[name] = inp[name][:, :, :n].contiguous() if valid > 0 and inp[name] is not None else None
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _dense(inp):
    """fp32 dense K/V `[B, H_kv, L, D]` of the inputs (history dequantized, then residual)."""
    ks, vs = [], []
    if inp["key_codes"] is not None:
        per_channel = inp["key_mode"] == "channel"
        ks.append(dequantize_history(inp["key_codes"], inp["key_scale"], inp["key_zero"], inp["bits"],
                                     inp["group_size"], per_channel))
        vs.append(dequantize_history(inp["value_codes"], inp["value_scale"], inp["value_zero"], inp["bits"],
                                     inp["group_size"], False))
    if inp["residual_keys"] is not None:
        ks.append(inp["residual_keys"].float())
        vs.append(inp["residual_values"].float())
    return torch.cat(ks, 2), torch.cat(vs, 2)


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("key_mode", ["channel", "token"])
@pytest.mark.parametrize("gq,nq", [(1, 1), (4, 1), (2, 5)])
def test_reference_matches_dense_sdpa(bits, key_mode, gq, nq):
    t = 64 if key_mode == "channel" else 41
    inp = make_inputs(2, 2, gq, nq, 32, t, 7, bits, 16, key_mode, dtype=torch.float32, seed=bits + gq + nq)
    kv_start = torch.tensor([0, 23])
    out = quantized_decode_attention(**inp, kv_start=kv_start, impl="torch")
    k, v = _dense(inp)
    b, hkv, length, d = k.shape
    k, v = k.repeat_interleave(gq, 1), v.repeat_interleave(gq, 1)
    pos = torch.arange(length)
    qpos = length - nq + torch.arange(nq)
    mask = (pos[None, :] <= qpos[:, None])[None, None] & (pos[None, None, None, :] >= kv_start.view(b, 1, 1, 1))
    expected = F.scaled_dot_product_attention(inp["query"], k, v, attn_mask=mask, scale=inp["scaling"])
    assert out.shape == inp["query"].shape
    assert rel_err(out, expected) < 1e-5


def test_reference_softcap_and_masked_rows_match_eager():
    inp = make_inputs(2, 2, 2, 3, 32, 32, 5, 4, 16, "channel", dtype=torch.float32, seed=3)
    length = 37
    kv_start = torch.tensor([4, length])  # row 1 is all padding: its queries see nothing -> zeros
    out = quantized_decode_attention(**inp, kv_start=kv_start, softcap=2.0, impl="torch")
    k, v = _dense(inp)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = inp["query"] @ k.transpose(-1, -2) * inp["scaling"]
    s = 2.0 * torch.tanh(s / 2.0)  # Gemma-2 eager: cap after scaling, before the mask
    pos = torch.arange(length)
    mask = (pos[None, :] <= (length - 3 + torch.arange(3))[:, None]) & (pos >= 4)
    s = s.masked_fill(~mask, float("-inf"))
    expected = torch.softmax(s, -1) @ v
    assert rel_err(out[0], expected[0]) < 1e-5
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    capped = quantized_decode_attention(**inp, kv_start=kv_start, impl="torch")
    assert rel_err(capped[0], out[0]) > 1e-3  # the cap changed something


# ---------------------------------------------------------------------------------------------- op
def test_op_validates_arguments():
    inp = make_inputs(1, 2, 2, 1, 32, 32, 3, 4, 16, "channel")
    with pytest.raises(ValueError, match="impl="):
        quantized_decode_attention(**inp, impl="cuda")
    with pytest.raises(ValueError, match="bits="):
        quantized_decode_attention(**{**inp, "bits": 3})
    with pytest.raises(ValueError, match="key_mode="):
        quantized_decode_attention(**{**inp, "key_mode": "group"})
    with pytest.raises(ValueError, match="key_scale has shape"):
        quantized_decode_attention(**{**inp, "key_mode": "token"})
    with pytest.raises(ValueError, match="multiple of group_size"):
        cut = {k: inp[k][:, :, :24] for k in ("key_codes", "value_codes", "value_scale", "value_zero")}
        quantized_decode_attention(**{**inp, **cut})
    with pytest.raises(ValueError, match="at least one key"):
        quantized_decode_attention(inp["query"], bits=4, group_size=16, scaling=1.0)
    with pytest.raises(ValueError, match="q=17"):
        quantized_decode_attention(**{**inp, "query": inp["query"].expand(-1, -1, 17, -1)})
    with pytest.raises(ValueError, match="kv_start"):
        quantized_decode_attention(**inp, kv_start=torch.zeros(3, dtype=torch.long))


def test_op_cpu_dispatch_and_fake():
    inp = make_inputs(1, 2, 2, 2, 32, 32, 3, 4, 16, "channel")
    ref = quantized_decode_attention(**inp, impl="sdpa")
    assert torch.equal(quantized_decode_attention(**inp), ref)  # auto on CPU: the sdpa path
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="impl='triton' cannot run here"):
            quantized_decode_attention(**inp, impl="triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
        out = quantized_decode_attention(**fake)
    assert out.shape == inp["query"].shape and out.dtype == inp["query"].dtype


# ---------------------------------------------------------------------------------------------- valid lengths
# (name, b, hkv, gq, nq, d, t_cap, t_valid, r_cap, r_valid, bits, G, key_mode, dtype, kv_start, extra kernel kwargs);
# the defaults pick v3 for 4/8 bits and v2 for 2 bits; "layout": "token" runs v4 over token-packed values
LENGTH_CASES = [
    ("b4-channel-q1-start-in-residual", 2, 2, 2, 1, 32, 96, 48, 16, 5, 4, 16, "channel", "float32", [0, 50], {}),
    ("b4-token-q3", 2, 2, 2, 3, 32, 80, 37, 16, 9, 4, 16, "token", "bfloat16", None, {}),
    ("b8-channel-q3-r0", 2, 2, 2, 3, 32, 64, 32, 16, 0, 8, 16, "channel", "bfloat16", [0, 7], {}),
    ("b8-token-q1-t0", 2, 2, 2, 1, 32, 48, 0, 16, 11, 8, 16, "token", "float32", [0, 3], {}),
    ("b2-channel-q3", 2, 2, 2, 3, 32, 96, 64, 16, 7, 2, 16, "channel", "float32", [5, 40], {}),
    ("b2-token-q1-t0", 2, 2, 2, 1, 32, 32, 0, 16, 13, 2, 16, "token", "bfloat16", None, {}),
    ("b2-token-q3-r0", 2, 2, 2, 3, 32, 64, 45, 8, 0, 2, 16, "token", "float32", [0, 9], {}),
    ("b4-channel-full", 2, 2, 2, 1, 32, 64, 64, 8, 8, 4, 16, "channel", "float32", [0, 3], {}),
    ("b4-short-idle-splits", 1, 2, 2, 1, 32, 160, 32, 40, 33, 4, 16, "channel", "float32", [7],
     {"num_splits": 7, "block_n": 16}),
    ("v2-b4-channel-q3", 2, 2, 2, 3, 32, 96, 48, 16, 5, 4, 16, "channel", "float32", [0, 21], {"variant": 2}),
    ("v4-b8-token-q1", 2, 2, 2, 1, 32, 64, 45, 16, 5, 8, 16, "token", "float32", [0, 21], {"layout": "token"}),
    ("v4-b4-channel-q3", 2, 2, 2, 3, 32, 96, 48, 16, 5, 4, 16, "channel", "bfloat16", [0, 50], {"layout": "token"}),
    ("v4-b2-token-q1-odd", 2, 2, 2, 1, 32, 80, 37, 16, 9, 2, 16, "token", "float32", None, {"layout": "token"}),
    ("v4-b4-token-t0", 2, 2, 2, 1, 32, 48, 0, 16, 11, 4, 16, "token", "float32", [0, 3], {"layout": "token"}),
]


def _length_case_inputs(case, seed):
    name, b, hkv, gq, nq, d, t_cap, t_valid, r_cap, r_valid, bits, gs, mode, dtype, start, extra = case
    cap, lengths, compact = valid_length_inputs(b, hkv, gq, nq, d, t_cap, t_valid, r_cap, r_valid, bits, gs, mode,
                                                dtype=getattr(torch, dtype), seed=seed)
    kv_start = None if start is None else torch.tensor(start)
    return cap, lengths, compact, kv_start


@pytest.mark.parametrize("case", LENGTH_CASES, ids=lambda c: c[0])
def test_reference_valid_lengths_match_compact(case):
    cap, lengths, compact, kv_start = _length_case_inputs(case, seed=7)
    out = quantized_decode_attention(**cap, kv_start=kv_start, lengths=lengths, impl="torch")
    expected = quantized_decode_attention(**compact, kv_start=kv_start, impl="torch")
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < 1e-6


def test_reference_valid_lengths_empty_and_clamped():
    cap, _, _ = valid_length_inputs(1, 2, 2, 1, 32, 32, 16, 8, 4, 4, 16, "channel", dtype=torch.float32)
    out = quantized_decode_attention(**cap, lengths=torch.tensor([0, 0]), impl="torch")
    assert torch.equal(out, torch.zeros_like(out))  # nothing valid: no query sees a key
    full = {k: v for k, v in cap.items()}
    full["key_scale"] = full["key_scale"].nan_to_num(1.0)  # no garbage: the whole capacity is valid
    for k in ("key_zero", "value_scale", "value_zero", "residual_keys", "residual_values"):
        full[k] = full[k].nan_to_num(1.0, posinf=1.0)
    clamped = quantized_decode_attention(**full, lengths=torch.tensor([99, 99]), impl="torch")
    assert torch.equal(clamped, quantized_decode_attention(**full, impl="torch"))


def test_op_validates_lengths():
    inp = make_inputs(1, 2, 2, 1, 32, 32, 3, 4, 16, "channel")
    for bad in (torch.tensor([32, 3, 0]), torch.tensor([[32, 3]]), torch.tensor([32.0, 3.0]),
                torch.tensor([True, False]), torch.tensor([32, 3], device="meta"), (32, 3)):
        with pytest.raises(ValueError, match=r"lengths must be None or a tensor of shape \(2,\)"):
            quantized_decode_attention(**inp, lengths=bad)
    out = quantized_decode_attention(**inp, lengths=torch.tensor([32, 3], dtype=torch.int32))
    assert torch.equal(out, quantized_decode_attention(**inp))


def test_op_valid_lengths_compile_no_recompile():
    cap, lengths, _ = valid_length_inputs(2, 2, 2, 1, 32, 64, 32, 16, 5, 4, 16, "channel", dtype=torch.float32)
    kv_start = torch.tensor([0, 9])

    def fn(lens):
        return quantized_decode_attention(**cap, kv_start=kv_start, lengths=lens, impl="torch") * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(lengths), fn(lengths))
    prev = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        for t_valid, r_valid in ((16, 5), (0, 3), (32, 0)):  # within the written (32, 5): garbage past them
            lens = torch.tensor([t_valid, r_valid])
            out = compiled(lens)
            assert torch.isfinite(out).all() and torch.equal(out, fn(lens))
        lengths.copy_(torch.tensor([16, 2]))  # in place, as a static cache does
        assert torch.equal(compiled(lengths), fn(lengths))
    finally:
        torch._dynamo.config.error_on_recompile = prev
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- interpreter
# (name, b, hkv, gq, nq, d, t, r, bits, G, key_mode, dtype, kv_start, softcap, extra kernel kwargs)
INTERPRET_CASES = []
for _bits in (8, 4, 2):
    for _mode in ("channel", "token"):
        for _gq, _nq in ((1, 1), (2, 1), (4, 3)):
            _t = 96 if _mode == "channel" else 77
            _dtype = "bfloat16" if _nq > 1 else "float32"  # fp32: exact logic check; bf16: the magic-number path
            INTERPRET_CASES.append((f"b{_bits}-{_mode}-gq{_gq}-q{_nq}-{_dtype}", 2, 2, _gq, _nq, 64, _t, 19, _bits, 32,
                                    _mode, _dtype, [0, 37], 0.0, {}))
INTERPRET_CASES += [
    ("residual-only", 2, 2, 2, 2, 32, 0, 45, 4, 16, "channel", "bfloat16", [0, 9], 0.0, {}),
    ("history-only", 2, 2, 2, 2, 32, 64, 0, 4, 16, "channel", "bfloat16", [0, 9], 0.0, {}),
    ("queries-in-history", 1, 2, 2, 4, 32, 48, 2, 4, 16, "token", "float32", None, 0.0, {}),
    ("padding-into-residual", 2, 1, 4, 1, 32, 32, 20, 8, 16, "channel", "float32", [3, 40], 0.0, {}),
    ("all-padding-row", 2, 1, 2, 1, 32, 32, 5, 4, 16, "channel", "float32", [0, 37], 0.0, {}),
    ("softcap", 2, 2, 2, 3, 32, 64, 11, 4, 16, "channel", "bfloat16", [0, 5], 5.0, {}),
    ("fp32", 2, 2, 4, 1, 64, 96, 19, 4, 32, "channel", "float32", [0, 37], 0.0, {}),
    ("fp16-int8", 2, 2, 4, 1, 64, 96, 19, 8, 32, "channel", "float16", [0, 37], 0.0, {}),
    ("fp16-int4-token", 2, 2, 4, 2, 64, 77, 19, 4, 32, "token", "float16", [0, 37], 0.0, {}),
    ("q16-gqa1", 1, 2, 1, 16, 32, 32, 17, 4, 16, "channel", "float32", None, 0.0, {}),
    ("many-splits", 1, 2, 2, 1, 32, 160, 33, 4, 32, "channel", "float32", [7], 0.0,
     {"num_splits": 7, "block_n": 16}),
    ("plain-convert", 2, 2, 2, 1, 32, 64, 9, 4, 16, "channel", "bfloat16", [0, 3], 0.0, {"magic": False}),
    ("variant2-int4-bf16", 2, 2, 2, 3, 64, 96, 19, 4, 32, "channel", "bfloat16", [0, 37], 0.0, {"variant": 2}),
    ("variant2-int8-fp16-token", 2, 2, 2, 1, 64, 77, 19, 8, 32, "token", "float16", [0, 37], 0.0, {"variant": 2}),
    # v3 (the default where it applies): exact codes, value scales folded into p (the inline-PTX conversion itself
    # runs only on a GPU)
    ("v3-int4-fp32", 2, 2, 4, 1, 64, 96, 19, 4, 32, "channel", "float32", [0, 37], 0.0, {"variant": 3}),
    ("v3-int4-bf16-q3", 2, 2, 2, 3, 64, 96, 19, 4, 32, "channel", "bfloat16", [0, 37], 0.0, {"variant": 3}),
    ("v3-int4-reduce-bias", 2, 2, 2, 1, 32, 64, 9, 4, 16, "channel", "float32", [0, 3], 0.0,
     {"variant": 3, "bias_dot": False}),
    ("v3-int4-token", 2, 2, 2, 2, 64, 77, 19, 4, 32, "token", "float32", [0, 37], 0.0, {"variant": 3}),
    ("v3-int8-fp32", 2, 2, 4, 1, 64, 96, 19, 8, 32, "channel", "float32", [0, 37], 0.0, {"variant": 3}),
    ("v3-int8-fp16-token", 2, 2, 2, 1, 64, 77, 19, 8, 32, "token", "float16", [0, 37], 0.0, {"variant": 3}),
    ("v3-one-group", 1, 2, 2, 1, 32, 160, 33, 4, 32, "channel", "float32", [7], 0.0,
     {"variant": 3, "num_splits": 7, "block_n": 16}),
    ("v3-softcap-residual-only", 2, 2, 2, 3, 32, 0, 45, 4, 16, "channel", "float32", [0, 9], 5.0, {"variant": 3}),
    ("v3-v-join", 2, 2, 2, 3, 64, 96, 19, 4, 32, "channel", "float32", [0, 37], 0.0, {"variant": 3, "v_join": True}),
    ("v3-v-join-bf16-residual-only", 2, 2, 2, 1, 32, 0, 45, 4, 16, "channel", "bfloat16", [0, 9], 0.0,
     {"variant": 3, "v_join": True}),
    ("v3-padding-into-residual", 2, 1, 4, 1, 32, 32, 20, 8, 16, "channel", "float32", [3, 40], 0.0, {"variant": 3}),
]
# v4: value codes token-packed (layouts.py); "layout": "token" converts the case's values before the call
for _bits in (8, 4, 2):
    for _mode in ("channel", "token"):
        for _gq, _nq in ((1, 1), (4, 3)):
            _t = 96 if _mode == "channel" else 77  # odd history length for per-token keys: a straddled last byte
            _dtype = "bfloat16" if _nq > 1 else "float32"
            INTERPRET_CASES.append((f"v4-b{_bits}-{_mode}-gq{_gq}-q{_nq}-{_dtype}", 2, 2, _gq, _nq, 64, _t, 19, _bits,
                                    32, _mode, _dtype, [0, 37], 0.0, {"layout": "token"}))
INTERPRET_CASES += [
    ("v4-k-join-int4", 2, 2, 2, 1, 64, 96, 19, 4, 32, "channel", "float32", [0, 37], 0.0,
     {"layout": "token", "k_join": True}),
    ("v4-k-join-int8-token-keys", 2, 2, 2, 1, 64, 77, 19, 8, 32, "token", "float32", [0, 37], 0.0,
     {"layout": "token", "k_join": True}),
    ("v4-reduce-bias", 2, 2, 2, 1, 32, 64, 9, 4, 16, "channel", "float32", [0, 3], 0.0,
     {"layout": "token", "bias_dot": False}),
    ("v4-four-value-groups", 1, 2, 2, 1, 64, 64, 9, 4, 16, "channel", "float32", [5], 0.0, {"layout": "token"}),
    ("v4-eight-value-groups-converted", 1, 2, 2, 1, 128, 32, 9, 4, 16, "channel", "float32", [5], 0.0,
     {"layout": "token"}),
    ("v4-padding-into-residual", 2, 1, 4, 1, 32, 32, 20, 8, 16, "channel", "float32", [3, 40], 0.0,
     {"layout": "token"}),
    ("v4-all-padding-row-softcap", 2, 1, 2, 3, 32, 32, 5, 4, 16, "channel", "float32", [0, 37], 5.0,
     {"layout": "token"}),
    ("v4-history-only-many-splits", 1, 2, 2, 1, 32, 160, 0, 4, 32, "channel", "float32", [7], 0.0,
     {"layout": "token", "num_splits": 7, "block_n": 16}),
    ("v4-residual-only", 2, 2, 2, 2, 32, 0, 45, 4, 16, "channel", "bfloat16", [0, 9], 0.0, {"layout": "token"}),
    ("v4-fp16-int8", 2, 2, 4, 1, 64, 96, 19, 8, 32, "channel", "float16", [0, 37], 0.0, {"layout": "token"}),
    # both v4 kernels at every bit width the defaults do not pick, and the peeled loop (interior tiles unmasked)
    ("v4-untransposed-int4-bf16-q3", 2, 2, 2, 3, 64, 96, 19, 4, 32, "channel", "bfloat16", [0, 37], 0.0,
     {"layout": "token", "transposed": False}),
    ("v4-transposed-int8-bf16", 2, 2, 4, 1, 64, 96, 19, 8, 32, "channel", "bfloat16", [0, 37], 0.0,
     {"layout": "token", "transposed": True}),
    ("v4-untransposed-int2-token", 2, 2, 2, 1, 64, 77, 19, 2, 32, "token", "float32", [0, 37], 0.0,
     {"layout": "token", "transposed": False}),
    ("v4-peeled-int4-bf16", 1, 2, 4, 2, 32, 256, 3, 4, 16, "channel", "bfloat16", [21], 0.0,
     {"layout": "token", "peel": True, "num_splits": 2, "block_n": 16}),
    ("v4-peeled-int8-softcap-q16", 1, 2, 1, 16, 32, 128, 0, 8, 16, "channel", "float32", [5], 5.0,
     {"layout": "token", "peel": True, "num_splits": 3, "block_n": 16}),
]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def triton_call(inp, kv_start, softcap=0.0, lengths=None, extra=None):
    """The Triton launcher over `make_inputs`-style keyword arguments: a `PackedKV` (value codes converted to the
    token layout when `extra["layout"] == "token"`) and a `DecodeConfig` from the other `extra` entries."""
    from kvpress_lite.kernels import triton_decode
    from kvpress_lite.kernels.layouts import from_channel_packed
    from kvpress_lite.kernels.packed import TOKEN_PACKED, PackedKV

    extra = dict(extra or {})
    layout = extra.pop("layout", "channel")
    vc = inp["value_codes"]
    if layout == "token" and vc is not None:
        vc = from_channel_packed(vc, inp["bits"])
    packed = PackedKV(inp["key_codes"], inp["key_scale"], inp["key_zero"], vc, inp["value_scale"],
                      inp["value_zero"], inp["residual_keys"], inp["residual_values"], inp["bits"], inp["group_size"],
                      inp["key_mode"], lengths, value_layout=TOKEN_PACKED if layout == "token" else "channel")
    return triton_decode.triton_decode_attention(inp["query"], packed, kv_start, inp["scaling"], softcap,
                                                 triton_decode.DecodeConfig(**extra))


def run_interpret_cases() -> dict:
    """Run every INTERPRET_CASES entry through the Triton kernel and the reference; {name: relative error}."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    torch.set_num_threads(1)
    results = {}
    for name, b, hkv, gq, nq, d, t, r, bits, gs, mode, dtype, start, cap, extra in INTERPRET_CASES:
        inp = make_inputs(b, hkv, gq, nq, d, t, r, bits, gs, mode, dtype=getattr(torch, dtype), seed=len(results))
        kv_start = None if start is None else torch.tensor(start)
        ref = quantized_decode_attention(**inp, kv_start=kv_start, softcap=cap, impl="torch")
        if extra:
            out = triton_call(inp, kv_start, cap, extra=extra)
        else:
            out = quantized_decode_attention(**inp, kv_start=kv_start, softcap=cap, impl="triton")
        finite = bool(torch.isfinite(out).all())
        zero_rows_ok = bool(torch.equal(out[ref.abs().sum(-1) == 0], ref[ref.abs().sum(-1) == 0]))
        results[name] = {"err": rel_err(out, ref), "finite": finite, "zero_rows_ok": zero_rows_ok,
                         "shape_ok": out.shape == ref.shape and out.dtype == ref.dtype, "dtype": dtype}
    for case in LENGTH_CASES:  # valid-length mode (capacity buffers + garbage) vs the reference on compact tensors
        name, mode, dtype, extra = case[0], case[12], case[13], case[15]
        cap, lengths, compact, kv_start = _length_case_inputs(case, seed=len(results))
        ref = quantized_decode_attention(**compact, kv_start=kv_start, impl="torch")
        if extra:
            out = triton_call(cap, kv_start, lengths=lengths, extra=extra)
        else:
            out = quantized_decode_attention(**cap, kv_start=kv_start, lengths=lengths, impl="triton")
        results["len-" + name] = {"err": rel_err(out, ref), "finite": bool(torch.isfinite(out).all()),
                                  "zero_rows_ok": True, "shape_ok": out.shape == ref.shape and out.dtype == ref.dtype,
                                  "dtype": dtype}
    return results


@pytest.fixture(scope="module")
def interpret_results():
    return interpreted_json(__file__)


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES])
def test_triton_kernel_matches_reference_interpreted(interpret_results, case):
    res = interpret_results[case]
    assert res["shape_ok"] and res["finite"] and res["zero_rows_ok"], res
    assert res["err"] < TOLERANCE[res["dtype"]], res


@pytest.mark.parametrize("case", [c[0] for c in LENGTH_CASES])
def test_triton_valid_lengths_match_compact_interpreted(interpret_results, case):
    res = interpret_results["len-" + case]
    assert res["shape_ok"] and res["finite"], res
    assert res["err"] < TOLERANCE[res["dtype"]], res


# ---------------------------------------------------------------------------------------------- GPU
GPU_CASES = [  # b, hkv, gq, nq, d, t, r, bits, G, key_mode
    (4, 8, 4, 1, 128, 8192, 150, 4, 64, "channel"),
    (4, 8, 4, 1, 128, 8192, 150, 8, 64, "channel"),
    (2, 8, 4, 4, 128, 4096, 131, 4, 64, "token"),
    (1, 4, 8, 1, 256, 2048, 140, 4, 64, "channel"),  # Gemma-like head_dim
    (2, 8, 4, 1, 128, 1024, 130, 2, 64, "channel"),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel at real shapes)")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_kernel_matches_reference_gpu(case):
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    b, hkv, gq, nq, d, t, r, bits, gs, mode = case
    inp = make_inputs(b, hkv, gq, nq, d, t, r, bits, gs, mode, device="cuda", seed=t + r)
    kv_start = torch.randint(0, 300, (b,), device="cuda")
    for softcap in (0.0, 30.0):
        out = quantized_decode_attention(**inp, kv_start=kv_start, softcap=softcap, impl="triton")
        ref = quantized_decode_attention(**inp, kv_start=kv_start, softcap=softcap, impl="torch")
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2


V34_GPU_CASES = [  # variant, bits, key_mode, dtype: v3 / v4 explicitly (inline-PTX code conversion), any default
    (4, 4, "channel", torch.bfloat16), (4, 8, "channel", torch.bfloat16), (4, 4, "token", torch.bfloat16),
    (4, 4, "channel", torch.float16), (4, 8, "token", torch.float16), (4, 2, "channel", torch.bfloat16),
    (3, 4, "channel", torch.bfloat16), (3, 8, "token", torch.float16),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel at real shapes)")
@pytest.mark.parametrize("case", V34_GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_v3_v4_match_reference_gpu(case):
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    variant, bits, mode, dtype = case
    inp = make_inputs(3, 8, 4, 2, 128, 4096 + (0 if mode == "channel" else 37), 77, bits, 64, mode, dtype=dtype,
                      device="cuda", seed=bits)
    kv_start = torch.tensor([0, 5, 300], device="cuda")
    layout = {"layout": "token"} if variant == 4 else {}
    # v4: the default (transposed, raw key codes) and the untransposed kernel
    options = ({}, {"bias_dot": False}) if variant == 3 else ({}, {"transposed": False})
    for softcap in (0.0, 30.0):
        ref = quantized_decode_attention(**inp, kv_start=kv_start, softcap=softcap, impl="torch")
        for extra in options:
            out = triton_call(inp, kv_start, softcap, extra={"variant": variant, **layout, **extra})
            assert torch.isfinite(out).all()
            assert rel_err(out, ref) < 1e-2, (softcap, extra, rel_err(out, ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel at real shapes)")
@pytest.mark.parametrize("key_mode", ["channel", "token"])
def test_triton_v4_valid_lengths_cuda_graph_gpu(key_mode):
    """v4 over a token-packed capacity buffer (garbage past the valid tokens), one CUDA graph replayed as the lengths
    change in place."""
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    t_cap, r_cap = 4096, 208
    cap, lengths, _ = valid_length_inputs(2, 8, 4, 1, 128, t_cap, 3008, r_cap, 150, 4, 64, key_mode, device="cuda",
                                          seed=5)
    kv_start = torch.tensor([0, 37], device="cuda")
    extra = {"layout": "token"}
    triton_call(cap, kv_start, lengths=lengths, extra=extra)  # compile outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = triton_call(cap, kv_start, lengths=lengths, extra=extra)
    for tv, rv in ((3008, 150), (0, 150), (1024, 0), (64, 1)):
        lengths.copy_(torch.tensor([tv, rv]))
        graph.replay()
        ref = quantized_decode_attention(**compact_inputs(cap, tv, rv), kv_start=kv_start, impl="torch")
        assert torch.isfinite(static_out).all() and rel_err(static_out, ref) < 1e-2, (tv, rv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel at real shapes)")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("key_mode", ["channel", "token"])
def test_triton_valid_lengths_gpu(bits, key_mode):
    """Valid-length mode at a real shape: eager vs the compact call, then one CUDA graph replayed as the lengths
    change in place (garbage past them)."""
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    t_cap, r_cap = 4096, 208
    t_valid = 3008 if key_mode == "channel" else 3000  # channel keys: whole groups of G = 64
    cap, lengths, compact = valid_length_inputs(2, 8, 4, 1, 128, t_cap, t_valid, r_cap, 150, bits, 64, key_mode,
                                                device="cuda", seed=bits)
    kv_start = torch.tensor([0, 37], device="cuda")
    out = quantized_decode_attention(**cap, kv_start=kv_start, lengths=lengths, impl="triton")
    compact_out = quantized_decode_attention(**compact, kv_start=kv_start, impl="triton")
    ref = quantized_decode_attention(**compact, kv_start=kv_start, impl="torch")
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2 and rel_err(out, compact_out) < 1e-2

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            quantized_decode_attention(**cap, kv_start=kv_start, lengths=lengths, impl="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = quantized_decode_attention(**cap, kv_start=kv_start, lengths=lengths, impl="triton")
    for tv, rv in ((t_valid, 150), (0, 150), (1024, 0), (64, 1)):
        lengths.copy_(torch.tensor([tv, rv]))
        graph.replay()
        ref = quantized_decode_attention(**compact_inputs(cap, tv, rv), kv_start=kv_start, impl="torch")
        assert torch.isfinite(static_out).all() and rel_err(static_out, ref) < 1e-2, (tv, rv)


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(run_interpret_cases()))


# ---------------------------------------------------------------------------------------------- impl "sdpa"
@pytest.mark.parametrize("case", LENGTH_CASES, ids=lambda c: c[0])
def test_sdpa_impl_matches_reference(case):
    """impl="sdpa" (the history dequantized in the cache dtype, then torch SDPA; the static cache's CPU path) computes
    the reference's attention: valid lengths over capacity buffers with garbage past them, GQA, q > 1, left padding
    (rows that see no key return zeros); within the cache dtype's rounding."""
    cap, lengths, compact, kv_start = _length_case_inputs(case, seed=3)
    ref = quantized_decode_attention(**compact, kv_start=kv_start, impl="torch")
    out = quantized_decode_attention(**cap, kv_start=kv_start, lengths=lengths, impl="sdpa")
    assert out.dtype == ref.dtype and out.shape == ref.shape and bool(torch.isfinite(out).all())
    tol = 2e-2 if out.dtype == torch.bfloat16 else 1e-4
    assert rel_err(out, ref) < tol
    no_key = ref.abs().sum(-1) == 0
    assert torch.equal(out[no_key], ref[no_key])


def test_sdpa_impl_softcap_falls_back_to_reference():
    inp = make_inputs(2, 2, 2, 3, 32, 32, 5, 4, 16, "channel", dtype=torch.float32)
    ref = quantized_decode_attention(**inp, softcap=5.0, impl="torch")
    assert torch.equal(quantized_decode_attention(**inp, softcap=5.0, impl="sdpa"), ref)


# ---------------------------------------------------------------------------------------------- token layout
def _codes(b, h, t, d, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (b, h, t, d), generator=g, dtype=torch.uint8)


def _dequant_values(codes, scale, zero, bits, gs):
    """Dequantized values `[B, H, T, D]` of token-major codes (kivi's per-token groups)."""
    from kvpress_lite.kivi import dequantize_values, pack

    return dequantize_values(pack(codes, bits), scale, zero, bits, gs).float()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("t", [0, 1, 7, 33, 64])
def test_token_layout_pack_roundtrip_and_nbytes(bits, t):
    from kvpress_lite.kernels.layouts import (
        from_channel_packed,
        pack_tokens,
        packed_columns,
        to_channel_packed,
        token_packed_nbytes,
        unpack_tokens,
    )
    from kvpress_lite.kivi import pack

    codes = _codes(2, 3, t, 16, bits, seed=t + bits)
    packed = pack_tokens(codes, bits, capacity=t + 5)
    assert packed.shape == (2, 3, 16, packed_columns(t + 5, bits)) and packed.shape[3] % 16 == 0
    assert packed.numel() == token_packed_nbytes(2, 3, 16, t + 5, bits)
    assert torch.equal(unpack_tokens(packed, bits, t), codes)
    pb = 8 // bits
    if t >= pb:  # byte 0 of channel 0 holds tokens 0 .. PB-1, the earliest in the low bits
        expect = sum(int(codes[0, 0, i, 0]) << (bits * i) for i in range(pb))
        assert int(packed[0, 0, 0, 0]) == expect
    assert torch.equal(to_channel_packed(packed, "token", bits, t), pack(codes, bits))
    assert torch.equal(from_channel_packed(pack(codes, bits), bits, t + 5), packed)
    with pytest.raises(ValueError, match="bits=3"):
        pack_tokens(codes, 3)
    with pytest.raises(ValueError, match="capacity"):
        pack_tokens(codes, bits, capacity=t - 1) if t else pack_tokens(codes, bits, capacity=-1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_token_layout_append_and_block_write_match_dequantized(bits):
    """Appending blocks after any history length (straddled bytes merged, the buffer growing) and writing blocks at
    any offset of a preallocated buffer equal the same operations on the dequantized values."""
    from kvpress_lite.kernels.layouts import append_tokens, unpack_tokens, write_tokens

    d, gs = 32, 16
    g = torch.Generator().manual_seed(bits)
    blocks = [_codes(2, 2, n, d, bits, seed=i) for i, n in enumerate((13, 8, 8, 64, 3, 8))]
    scale = torch.rand(2, 2, 96, d // gs, generator=g) + 0.1
    zero = torch.randn(2, 2, 96, d // gs, generator=g)
    buf, t = None, 0
    for blk in blocks:  # history lengths 0, 13 (odd), 21, 29, 93, 96, then 104
        new = append_tokens(buf, t, blk, bits, grow=32)
        if buf is not None and new.shape == buf.shape:
            assert new.data_ptr() == buf.data_ptr()  # room left: written in place, no reallocation
        buf, t = new, t + blk.shape[2]
    dense = torch.cat(blocks, 2)[:, :, :96]
    t = 96
    got = _dequant_values(unpack_tokens(buf, bits, t), scale, zero, bits, gs)
    assert torch.equal(got, _dequant_values(dense, scale, zero, bits, gs))
    # in place at arbitrary offsets of a static buffer, neighbours untouched
    static = append_tokens(None, 0, dense, bits, grow=128)
    ptr = static.data_ptr()
    expect = dense.clone()
    for off, n in ((0, 8), (5, 3), (37, 16), (95, 1)):
        blk = _codes(2, 2, n, d, bits, seed=100 + off)
        assert write_tokens(static, off, blk, bits).data_ptr() == ptr
        expect[:, :, off:off + n] = blk
    assert torch.equal(_dequant_values(unpack_tokens(static, bits, 96), scale[:, :, :96], zero[:, :, :96], bits, gs),
                       _dequant_values(expect, scale[:, :, :96], zero[:, :, :96], bits, gs))
    with pytest.raises(ValueError, match="do not fit"):
        write_tokens(static, static.shape[3] * (8 // bits) - 1, blocks[1], bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_token_layout_gather_matches_dequantized_and_reference_attention(bits):
    """Eviction's keep (arbitrary slots per row and head) on the token layout equals the gather of the dequantized
    values, and the reference attention over it equals the one over the channel layout gathered the same way."""
    from kvpress_lite.kernels.layouts import gather_tokens, pack_tokens, unpack_tokens
    from kvpress_lite.kivi import pack

    b, h, t, d, gs = 2, 2, 45, 32, 16
    inp = make_inputs(b, h, 2, 1, d, t, 5, bits, gs, "token", dtype=torch.float32, seed=bits)
    codes = _codes(b, h, t, d, bits, seed=7)
    idx = torch.stack([torch.randperm(t, generator=torch.Generator().manual_seed(i))[:29].sort().values
                       for i in range(b * h)]).view(b, h, 29)
    kept = gather_tokens(pack_tokens(codes, bits), t, idx, bits)
    dense = torch.gather(codes, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
    scale = torch.gather(inp["value_scale"], 2, idx.unsqueeze(-1).expand(-1, -1, -1, d // gs))
    zero = torch.gather(inp["value_zero"], 2, idx.unsqueeze(-1).expand(-1, -1, -1, d // gs))
    assert torch.equal(_dequant_values(unpack_tokens(kept, bits, 29), scale, zero, bits, gs),
                       _dequant_values(dense, scale, zero, bits, gs))
    ks = torch.gather(inp["key_codes"], 2, idx.unsqueeze(-1).expand(-1, -1, -1, inp["key_codes"].shape[3]))
    kss = torch.gather(inp["key_scale"], 2, idx.unsqueeze(-1).expand(-1, -1, -1, d // gs))
    kzz = torch.gather(inp["key_zero"], 2, idx.unsqueeze(-1).expand(-1, -1, -1, d // gs))
    from kvpress_lite.kernels.packed import PackedKV
    from kvpress_lite.kernels.reference import reference_decode_attention

    def view(value_codes, layout):
        return PackedKV(ks, kss, kzz, value_codes, scale, zero, inp["residual_keys"], inp["residual_values"], bits, gs,
                        "token", value_layout=layout)

    out_t = reference_decode_attention(inp["query"], view(kept, "token"), None, inp["scaling"])
    out_c = reference_decode_attention(inp["query"], view(pack(dense, bits), "channel"), None, inp["scaling"])
    assert torch.equal(out_t, out_c)
    with pytest.raises(ValueError, match="layout="):
        reference_decode_attention(inp["query"], view(kept, "tiled"), None, inp["scaling"])
