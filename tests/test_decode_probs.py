"""Attention probabilities from the decode pass (`kernels.decode_probs`) and the fixed-slot step that scores from them.

* the torch reference's probabilities and per-entry validity (`positions`) against a dense masked softmax (CPU);
* the op under torch.compile (fake implementation) and the fixed-slot cache through the seam with the reference
  (`prefer("torch")`), eager and compiled by `generate`, against the layer's own torch path (CPU);
* the Triton kernels' output and probabilities against the reference under `TRITON_INTERPRET=1` (one subprocess:
  `python tests/test_decode_probs.py --interpret`): v2, v3, v4, v4t, int4 and int8, GQA groups > 1, several splits,
  masked entries in the middle (positions), softcap on and off, batch 2 with left pads, valid lengths; and the
  fixed-slot cache with `prefer("triton")` against its torch path (tokens, logits, the policy's scores);
* the same at real shapes on a GPU (`-k cuda`, skipped without CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import greedy_with_logits, left_padded_prompt, tiny_llama
from interpreted import interpreted_json
from test_kernels import make_inputs, rel_err, valid_length_inputs

from kvpress_lite import FixedSlotEvictionCache, kernels
from kvpress_lite.kernels import dequantize_history, reference_decode_attention_probs
from kvpress_lite.kernels.packed import TOKEN_PACKED, PackedKV

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(budget=24, sinks=2, recent=8)  # 40-token prompts: 16 slots + an 8-token ring per (row, kv head)


def packed_of(inp, lengths=None, layout="channel") -> PackedKV:
    """A `PackedKV` of `make_inputs`-style keyword arguments (value codes converted to the token layout on request)."""
    from kvpress_lite.kernels.layouts import from_channel_packed

    vc = inp["value_codes"]
    if layout == "token" and vc is not None:
        vc = from_channel_packed(vc, inp["bits"])
    return PackedKV(inp["key_codes"], inp["key_scale"], inp["key_zero"], vc, inp["value_scale"], inp["value_zero"],
                    inp["residual_keys"], inp["residual_values"], inp["bits"], inp["group_size"], inp["key_mode"],
                    lengths, value_layout=TOKEN_PACKED if layout == "token" else "channel")


def entry_positions(b, hkv, n, seed, empty=0.2):
    """int32 `[b, hkv, n]`: a random permutation of positions per (row, head), a fraction `empty` of entries -1
    (empty), so valid entries are not a prefix (entries below a row's kv_start are its left pads)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.randperm(n, generator=g) for _ in range(b * hkv)]).view(b, hkv, n).to(torch.int32)
    return pos.masked_fill(torch.rand(b, hkv, n, generator=g) < empty, -1)


# ---------------------------------------------------------------------------------------------- reference (CPU)
@pytest.mark.parametrize("with_positions", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_reference_probs_match_dense_softmax(with_positions, softcap):
    """The reference's output and probabilities equal a dense masked softmax over the dequantized entries: per-entry
    validity `positions >= kv_start` (or the logical prefix rule), causality among q = 3 queries, GQA 2; the
    probabilities summed over query heads and queries, at capacity indices (history, then residual)."""
    b, hkv, gq, nq, d, t, r = 2, 2, 2, 3, 32, 40, 9
    inp = make_inputs(b, hkv, gq, nq, d, t, r, 4, 16, "token", dtype=torch.float32, seed=3)
    kv_start = torch.tensor([0, 11])
    positions = entry_positions(b, hkv, t + r, seed=4) if with_positions else None
    out, probs = reference_decode_attention_probs(inp["query"], packed_of(inp), kv_start, inp["scaling"], softcap,
                                                  positions)
    keys = torch.cat([dequantize_history(inp["key_codes"], inp["key_scale"], inp["key_zero"], 4, 16, False),
                      inp["residual_keys"]], 2)
    values = torch.cat([dequantize_history(inp["value_codes"], inp["value_scale"], inp["value_zero"], 4, 16, False),
                        inp["residual_values"]], 2)
    q = inp["query"].view(b, hkv, gq * nq, d)
    s = q @ keys.transpose(-1, -2) * inp["scaling"]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    n = t + r
    idx = torch.arange(n)
    causal = idx[None, :] <= (n - nq + torch.arange(nq)).repeat(gq)[:, None]  # (Gq*q, N)
    seen = (positions if with_positions else idx.expand(b, hkv, n)) >= kv_start.view(b, 1, 1)  # (B, H, N)
    allowed = causal[None, None] & seen[:, :, None]
    p = s.masked_fill(~allowed, -float("inf")).softmax(-1).nan_to_num(0.0)
    torch.testing.assert_close(out, (p @ values).view(b, hkv * gq, nq, d))
    torch.testing.assert_close(probs, p.sum(2))
    assert bool((probs[~seen] == 0).all())


def test_reference_probs_valid_lengths_and_fake():
    """Capacity buffers: probabilities only at the valid history / residual indices (0 past them, garbage ignored);
    the op's fake implementation gives the shapes the kernel gives."""
    cap, lengths, compact = valid_length_inputs(2, 2, 2, 1, 32, 48, 29, 16, 5, 8, 16, "token", dtype=torch.float32,
                                                seed=2)
    kv_start = torch.tensor([0, 3])
    out, probs = reference_decode_attention_probs(cap["query"], packed_of(cap, lengths), kv_start, cap["scaling"])
    ref_out, ref_probs = reference_decode_attention_probs(compact["query"], packed_of(compact), kv_start,
                                                          compact["scaling"])
    assert probs.shape == (2, 2, 48 + 16)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs[:, :, :29], ref_probs[:, :, :29])
    torch.testing.assert_close(probs[:, :, 48:53], ref_probs[:, :, 29:])
    assert not probs[:, :, 29:48].any() and not probs[:, :, 53:].any()
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kvpress_lite.kernels.op import decode_op

    packed = packed_of(cap, lengths)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in packed.tensors()]
        f_out, f_probs = decode_op(mode.from_tensor(cap["query"]), *fake, mode.from_tensor(kv_start), None,
                                   *packed.statics(), 1.0, 0.0, "torch", True)
    assert f_out.shape == out.shape and f_probs.shape == probs.shape and f_probs.dtype == torch.float32


def test_decode_probs_refuses_an_implementation_without_probabilities():
    inp = make_inputs(1, 2, 2, 1, 32, 32, 3, 4, 16, "token", dtype=torch.float32)
    assert kernels.probs_impl("auto", torch.device("cpu"), torch.float32, 32, 4, 16, "token") is None or \
        os.environ.get("TRITON_INTERPRET") == "1"  # CPU "auto" is the sdpa path: no probabilities
    with pytest.raises(RuntimeError, match="computes no attention probabilities"):
        kernels.decode_probs(inp["query"], packed_of(inp), None, None, None, impl="sdpa")


# ---------------------------------------------------------------------------------------------- fixed slots (CPU)
def _compile_config():
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None, dynamic=False)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    return config


def fixed_slot_run(policy, bits, impl=None, new_tokens=20, compile_config=None, device="cpu", bf16_kernel=False):
    """(tokens, logits, scores and positions of layer 0) of greedy decoding through a fixed-slot cache (tiny Llama,
    batch 2, one row left-padded, evicting: budget 24 of 60), the seam's "auto" replaced by `impl` when given."""
    model = tiny_llama().to(device)
    ids, mask = left_padded_prompt()
    kwargs = {} if compile_config is None else {"compile_config": compile_config}
    with FixedSlotEvictionCache(model, policy=policy, bits=bits, group_size=16, bf16_kernel=bf16_kernel,
                                **SMALL) as cache:
        with kernels.prefer(impl) if impl else contextlib.nullcontext():
            seq, logits = greedy_with_logits(model, cache, ids.to(device), mask.to(device), new_tokens, **kwargs)
        return seq, logits, cache.layers[0].scores.clone(), cache.layers[0].positions.clone()


@contextlib.contextmanager
def counting(name):
    """Records the `return_probs` flag of every call of implementation `name`'s `probs_fn` (a list)."""
    impl = kernels.IMPLEMENTATIONS[name]
    original, calls = impl.probs_fn, []
    object.__setattr__(impl, "probs_fn", lambda *a: calls.append(a[-1]) or original(*a))
    try:
        yield calls
    finally:
        object.__setattr__(impl, "probs_fn", original)


@pytest.mark.parametrize(("policy", "bits"), [("h2o", 4), ("tova", 8), ("knorm", 4), ("snapkv", None)])
def test_fixed_slot_seam_with_the_reference_equals_the_torch_path(policy, bits):
    """`prefer("torch")`: the step runs through `decode_probs` (packed slots, ring as residual, validity by positions;
    full-precision slots with `bf16_kernel`: every entry as the residual) with the fp32 reference; the same tokens,
    logits and policy scores as the layer's own torch path."""
    seq_ref, logits_ref, scores_ref, pos_ref = fixed_slot_run(policy, bits)
    with counting("torch") as calls:
        seq, logits, scores, pos = fixed_slot_run(policy, bits, impl="torch", bf16_kernel=bits is None)
    assert calls and all(c == (policy != "knorm") for c in calls)  # probabilities only for attention policies
    assert torch.equal(seq, seq_ref) and torch.equal(pos, pos_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, scores_ref, atol=1e-5, rtol=1e-5)


def test_fixed_slot_kernel_impl_option():
    """`kernel_impl="torch"` forces the seam per cache (no `prefer`), "sdpa" keeps the torch step; a bad value raises
    naming the parameter."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    for impl, expected in (("torch", True), ("sdpa", False)):
        with FixedSlotEvictionCache(model, bits=4, group_size=16, kernel_impl=impl, **SMALL) as cache:
            with counting("torch") as calls:
                greedy_with_logits(model, cache, ids, mask, 3)
        assert bool(calls) == expected, impl
    with pytest.raises(ValueError, match="kernel_impl='bogus'"):
        FixedSlotEvictionCache(model, bits=4, kernel_impl="bogus")


def test_fixed_slot_seam_compiled_by_generate_is_one_graph():
    """The seam's op inside generate's compiled step (aot_eager, fullgraph, a recompile raises): one graph, the
    uncompiled tokens and scores."""
    seq_ref, logits_ref, scores_ref, _ = fixed_slot_run("h2o", 4, impl="torch")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True), counting("torch") as calls:
        seq, logits, scores, _ = fixed_slot_run("h2o", 4, impl="torch", compile_config=_compile_config())
    assert counters["stats"]["unique_graphs"] == 1
    assert len(calls) == 2 * 19  # the op's body: every layer and decode step
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, scores_ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- interpreter
# (name, b, hkv, gq, nq, d, t, r, bits, G, key_mode, dtype, kv_start, softcap, extra kernel kwargs, positions)
# Defaults with channel-packed values: v3 where D / G <= 2 (4/8 bits), else v2 (the fixed-slot storage at D = 128,
# G = 32); "layout": "token" runs v4 (int4 default: transposed, v4t; int8: untransposed).
PROB_CASES = [
    ("v2-int4-token-keys-pos", 2, 2, 2, 1, 64, 77, 19, 4, 16, "token", "float32", [0, 37], 0.0, {}, True),
    ("v2-int8-gq4-softcap-pos", 2, 2, 4, 1, 64, 77, 19, 8, 16, "token", "float32", [3, 20], 5.0, {}, True),
    ("v2-int4-channel-q3-prefix", 2, 2, 2, 3, 64, 96, 19, 4, 32, "channel", "float32", [0, 37], 0.0,
     {"variant": 2}, False),
    ("v3-int4-token-keys-pos", 2, 2, 2, 1, 64, 77, 19, 4, 32, "token", "float32", [0, 37], 0.0, {}, True),
    ("v3-int8-token-keys-pos-bf16", 2, 2, 4, 1, 64, 77, 19, 8, 32, "token", "bfloat16", [0, 37], 0.0, {}, True),
    ("v3-int4-channel-q3-softcap-bf16", 2, 2, 2, 3, 64, 96, 19, 4, 32, "channel", "bfloat16", [0, 37], 5.0, {},
     False),
    ("v3-many-splits-pos", 1, 2, 2, 1, 32, 160, 33, 4, 32, "token", "float32", [7], 0.0,
     {"num_splits": 7, "block_n": 16}, True),
    ("v3-residual-only-pos", 2, 2, 2, 1, 32, 0, 45, 4, 16, "channel", "float32", [0, 9], 0.0, {}, True),
    ("v3-all-padding-row", 2, 1, 2, 1, 32, 32, 5, 4, 16, "channel", "float32", [0, 37], 0.0, {}, False),
    ("v3-q16-gq2-pos", 1, 2, 2, 16, 32, 64, 9, 4, 16, "channel", "float32", [5], 0.0, {}, True),
    ("v4t-int4-channel-gq4", 2, 2, 4, 1, 64, 96, 19, 4, 32, "channel", "float32", [0, 37], 0.0,
     {"layout": "token"}, False),
    ("v4t-int4-token-keys-pos-softcap", 2, 2, 4, 1, 64, 77, 19, 4, 32, "token", "float32", [0, 37], 5.0,
     {"layout": "token"}, True),
    ("v4-int8-channel-q3-bf16", 2, 2, 2, 3, 64, 96, 19, 8, 32, "channel", "bfloat16", [0, 37], 0.0,
     {"layout": "token"}, False),
    ("v4-int8-token-keys-pos", 2, 2, 4, 1, 64, 77, 19, 8, 32, "token", "float32", [0, 37], 0.0,
     {"layout": "token"}, True),
    ("v4t-peeled-prefix", 1, 2, 4, 2, 32, 256, 3, 4, 16, "channel", "float32", [21], 0.0,
     {"layout": "token", "peel": True, "num_splits": 2, "block_n": 16}, False),
    ("v4t-peel-off-with-pos", 1, 2, 4, 2, 32, 256, 3, 4, 16, "channel", "float32", [21], 0.0,
     {"layout": "token", "peel": True, "num_splits": 2, "block_n": 16}, True),
]
# valid lengths (capacity buffers, garbage past the valid tokens): (name, b, hkv, gq, nq, d, t_cap, t_valid, r_cap,
# r_valid, bits, G, key_mode, dtype, kv_start, extra, positions)
PROB_LENGTH_CASES = [
    ("len-v3-int4-token-pos", 2, 2, 2, 1, 32, 80, 37, 16, 9, 4, 16, "token", "float32", [0, 7], {}, True),
    ("len-v3-int8-channel-prefix", 2, 2, 2, 1, 32, 64, 32, 16, 5, 8, 16, "channel", "float32", [0, 40], {}, False),
    ("len-v4t-int4-channel-prefix", 2, 2, 2, 1, 32, 96, 48, 16, 5, 4, 16, "channel", "float32", [0, 50],
     {"layout": "token"}, False),
]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def _kernel(inp, kv_start, softcap, positions, extra, lengths=None):
    from kvpress_lite.kernels import triton_decode

    extra = dict(extra)
    layout = extra.pop("layout", "channel")
    return triton_decode.triton_decode_attention(inp["query"], packed_of(inp, lengths, layout), kv_start,
                                                 inp["scaling"], softcap, triton_decode.DecodeConfig(**extra),
                                                 positions=positions, return_probs=True)


def _compare(out, probs, ref_out, ref_probs, dtype):
    return {"out_err": rel_err(out, ref_out), "probs_err": rel_err(probs, ref_probs),
            "probs_max": (probs - ref_probs).abs().max().item(), "dtype": dtype,
            "finite": bool(torch.isfinite(out).all() and torch.isfinite(probs).all()),
            "zeros_ok": bool((probs[ref_probs == 0] == 0).all()),
            "shape_ok": probs.shape == ref_probs.shape and probs.dtype == torch.float32}


def run_interpret_cases() -> dict:
    """Every PROB_CASES / PROB_LENGTH_CASES entry through the Triton kernel and the reference, and the fixed-slot
    cache with `prefer("triton")` against its torch path; {name: measurements}."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    torch.set_num_threads(1)
    results = {}
    for name, b, hkv, gq, nq, d, t, r, bits, gs, mode, dtype, start, cap, extra, use_pos in PROB_CASES:
        seed = len(results)
        inp = make_inputs(b, hkv, gq, nq, d, t, r, bits, gs, mode, dtype=getattr(torch, dtype), seed=seed)
        kv_start = torch.tensor(start)
        positions = entry_positions(b, hkv, t + r, seed) if use_pos else None
        ref_out, ref_probs = reference_decode_attention_probs(inp["query"], packed_of(inp), kv_start, inp["scaling"],
                                                              cap, positions)
        out, probs = _kernel(inp, kv_start, cap, positions, extra)
        results[name] = _compare(out, probs, ref_out, ref_probs, dtype)
    for name, b, hkv, gq, nq, d, t_cap, t_valid, r_cap, r_valid, bits, gs, mode, dtype, start, extra, use_pos in \
            PROB_LENGTH_CASES:
        seed = len(results)
        cap, lengths, _ = valid_length_inputs(b, hkv, gq, nq, d, t_cap, t_valid, r_cap, r_valid, bits, gs, mode,
                                              dtype=getattr(torch, dtype), seed=seed)
        kv_start = torch.tensor(start)
        positions = entry_positions(b, hkv, t_cap + r_cap, seed) if use_pos else None
        ref_out, ref_probs = reference_decode_attention_probs(cap["query"], packed_of(cap, lengths), kv_start,
                                                              cap["scaling"], 0.0, positions)
        out, probs = _kernel(cap, kv_start, 0.0, positions, extra, lengths)
        results[name] = _compare(out, probs, ref_out, ref_probs, dtype)
    for policy, bits in (("h2o", 4), ("tova", 8), ("h2o", None)):  # the fixed-slot step through the kernel
        seq_ref, logits_ref, scores_ref, pos_ref = fixed_slot_run(policy, bits, new_tokens=12)
        with counting("triton") as calls:
            seq, logits, scores, pos = fixed_slot_run(policy, bits, impl="triton", new_tokens=12,
                                                      bf16_kernel=bits is None)
        results[f"fixed-slot-{policy}-int{bits}"] = {
            "kernel_calls": len(calls), "probs_every_call": all(calls),
            "tokens_equal": bool(torch.equal(seq, seq_ref)), "positions_equal": bool(torch.equal(pos, pos_ref)),
            "logits_err": rel_err(logits, logits_ref), "scores_err": rel_err(scores, scores_ref)}
    return results


@pytest.fixture(scope="module")
def interpret_results():
    return interpreted_json(__file__, timeout=900)


@pytest.mark.parametrize("case", [c[0] for c in PROB_CASES + PROB_LENGTH_CASES])
def test_kernel_probs_match_reference_interpreted(interpret_results, case):
    res = interpret_results[case]
    assert res["shape_ok"] and res["finite"] and res["zeros_ok"], res
    tol = TOLERANCE[res["dtype"]]
    assert res["out_err"] < tol and res["probs_err"] < tol, res


@pytest.mark.parametrize("case", ["fixed-slot-h2o-int4", "fixed-slot-tova-int8", "fixed-slot-h2o-intNone"])
def test_fixed_slot_kernel_path_matches_torch_path_interpreted(interpret_results, case):
    """The fixed-slot step with the Triton kernel (interpreter, fp32; "intNone": full-precision slots with
    `bf16_kernel`, every entry the kernel's residual): the torch path's tokens, kept positions, logits and policy
    scores (within float rounding)."""
    res = interpret_results[case]
    assert res["kernel_calls"] == 2 * 11 and res["probs_every_call"], res  # 2 layers x 11 decode steps
    assert res["tokens_equal"] and res["positions_equal"], res
    assert res["logits_err"] < 1e-5 and res["scores_err"] < 1e-5, res


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(run_interpret_cases()))


# ---------------------------------------------------------------------------------------------- GPU
CUDA_CASES = [  # b, hkv, gq, d, t, r, bits, G, key_mode, layout, positions: fixed-slot-like and decode-like shapes
    (4, 8, 4, 128, 2048, 64, 4, 32, "token", "channel", True),  # the fixed-slot storage (v2 at G = 32)
    (4, 8, 4, 128, 2048, 64, 8, 32, "token", "channel", True),
    (4, 8, 4, 128, 2048, 64, 4, 64, "token", "channel", True),  # v3
    (4, 8, 4, 128, 2048, 64, 8, 64, "token", "channel", True),
    (4, 8, 4, 128, 8192, 150, 4, 64, "channel", "token", False),  # v4t (int4 default), left padding
    (4, 8, 4, 128, 8192, 150, 8, 64, "channel", "token", False),  # v4 untransposed (int8 default)
    (2, 8, 4, 128, 4096, 64, 4, 64, "token", "token", True),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel at real shapes)")
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_probs_match_reference_cuda(case):
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    from kvpress_lite.kernels import triton_decode

    b, hkv, gq, d, t, r, bits, gs, mode, layout, use_pos = case
    inp = make_inputs(b, hkv, gq, 1, d, t, r, bits, gs, mode, device="cuda", seed=t + bits)
    kv_start = torch.randint(0, 300, (b,), device="cuda")
    positions = entry_positions(b, hkv, t + r, seed=bits).cuda() if use_pos else None
    for softcap in (0.0, 30.0):
        packed = packed_of(inp, layout=layout)
        out, probs = triton_decode.triton_decode_attention(inp["query"], packed, kv_start, inp["scaling"], softcap,
                                                           positions=positions, return_probs=True)
        plain = triton_decode.triton_decode_attention(inp["query"], packed, kv_start, inp["scaling"], softcap,
                                                      positions=positions)
        ref_out, ref_probs = reference_decode_attention_probs(inp["query"], packed, kv_start, inp["scaling"], softcap,
                                                              positions)
        assert torch.isfinite(out).all() and torch.isfinite(probs).all()
        assert rel_err(out, plain) < 1e-3  # the flag changes nothing else (up to FMA contraction of the scores)
        assert rel_err(out, ref_out) < 1e-2 and rel_err(probs, ref_probs) < 1e-2, (softcap, rel_err(probs, ref_probs))
        torch.testing.assert_close(probs.sum(-1), ref_probs.sum(-1), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel at real shapes)")
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_probs_cuda_graph_cuda(bits):
    """One CUDA graph of the fixed-slot launch (positions + probabilities, per-token keys, G = 32: v2) replayed while
    positions, n_pad and a slot's codes change in place, as a compiled decode step does: each replay equals the
    reference on the current data."""
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    from kvpress_lite.kernels import triton_decode

    b, hkv, gq, d, s, w = 4, 8, 4, 128, 2048, 16
    inp = make_inputs(b, hkv, gq, 1, d, s, w, bits, 32, "token", device="cuda", seed=bits)
    packed = packed_of(inp)
    positions = entry_positions(b, hkv, s + w, seed=bits).cuda()
    n_pad = torch.tensor([0, 3, 40, 0], device="cuda")

    def launch():
        return triton_decode.triton_decode_attention(inp["query"], packed, n_pad, inp["scaling"], 0.0,
                                                     positions=positions, return_probs=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            launch()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, probs = launch()
    for step in range(3):
        positions.copy_(entry_positions(b, hkv, s + w, seed=100 + step).cuda())
        n_pad.copy_(torch.tensor([step, 0, 7 * step, 1], device="cuda"))
        packed.key_codes[:, :, step].random_(0, 256)
        graph.replay()
        ref_out, ref_probs = reference_decode_attention_probs(inp["query"], packed, n_pad, inp["scaling"], 0.0,
                                                              positions)
        assert rel_err(out, ref_out) < 1e-2 and rel_err(probs, ref_probs) < 1e-2, step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel at real shapes)")
@pytest.mark.parametrize(("policy", "bits"), [("h2o", 4), ("tova", 8), ("h2o", None)])
def test_fixed_slot_kernel_path_cuda(policy, bits):
    """On CUDA the fixed-slot step runs the kernel ("auto"; bits None: `bf16_kernel=True`); fp32 tiny Llama with
    head_dim 64 (the kernel needs >= 16 code bytes per token): the reference path's tokens, positions, logits and
    scores; then compiled by `generate` (inductor, CUDA graphs) the same tokens."""
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    run = functools.partial(_cuda_fixed_slot_run, policy, bits)
    assert kernels.probs_impl("auto", torch.device("cuda"), torch.float32, 64, bits or 8, 16, "token").name == "triton"
    seq_ref, logits_ref, scores_ref, pos_ref = run(impl="torch")
    seq, logits, scores, pos = run()
    assert torch.equal(seq, seq_ref) and torch.equal(pos, pos_ref)
    assert rel_err(logits, logits_ref) < 1e-4 and rel_err(scores, scores_ref) < 1e-4
    torch._dynamo.reset()
    seq_c, logits_c, scores_c, _ = run(compiled=True)
    assert torch.equal(seq_c, seq) and rel_err(logits_c, logits) < 1e-4 and rel_err(scores_c, scores) < 1e-4


def _cuda_fixed_slot_run(policy, bits, impl=None, compiled=False):
    model = tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64).cuda()
    ids, mask = left_padded_prompt()
    kwargs = {} if compiled else {"disable_compile": True}
    with FixedSlotEvictionCache(model, policy=policy, bits=bits, group_size=16, bf16_kernel=bits is None,
                                **SMALL) as cache:
        with kernels.prefer(impl) if impl else contextlib.nullcontext(), counting("triton") as calls:
            seq, logits = greedy_with_logits(model, cache, ids.cuda(), mask.cuda(), 20, **kwargs)
        assert impl == "torch" or compiled or len(calls) == 2 * 19  # eager "auto": the kernel every layer and step
        return seq, logits, cache.layers[0].scores.clone(), cache.layers[0].positions.clone()
