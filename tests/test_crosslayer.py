"""Cross-layer caches: MiniCache merge math, share wiring, bytes, beam reorder, validation, generate modes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama
from generation_checks import assert_beams_match_teacher_forcing, assert_sampled_from_cache

from kvpress_lite import cache_kwarg
from kvpress_lite._compat import DynamicCache
from kvpress_lite.cache import ModelGeometry
from kvpress_lite.crosslayer import CrossLayerCache, CrossLayerPlan, MergedPair
from kvpress_lite.crosslayer.calibration import pair_fraction
from kvpress_lite.crosslayer.merge import slerp, unit
from kvpress_lite.memory import cache_nbytes
from kvpress_lite.registry import build_cache

B, H, D = 2, 2, 16


def tiny_llama6(seed: int = 0):
    """A 6-layer random Llama (4 heads, 2 KV heads, head_dim 16): room for merge pairs."""
    return tiny_llama(seed=seed, num_layers=6, max_position_embeddings=1024, pad_token_id=0)


def tiny_gemma6(seed: int = 0):
    """A 6-layer random Gemma 3: sliding layers 0, 2, 4 (window 8), full layers 1, 3, 5."""
    return tiny_gemma3(seed=seed, num_hidden_layers=6, max_position_embeddings=1024, pad_token_id=0,
                       layer_types=["sliding_attention", "full_attention"] * 3)


def feed(cache, n_layers: int, tokens: int, chunk: int, seed: int = 0, batch: int = B):
    """Drive `cache` as a model would: each forward updates layers 0..n-1 in order. Returns every layer's input."""
    g = torch.Generator().manual_seed(seed)
    inputs = [([], []) for _ in range(n_layers)]
    for start in range(0, tokens, chunk):
        q = min(chunk, tokens - start)
        for layer in range(n_layers):
            k, v = torch.randn(batch, H, q, D, generator=g), torch.randn(batch, H, q, D, generator=g)
            inputs[layer][0].append(k)
            inputs[layer][1].append(v)
            cache.update(k, v, layer)
    return [(torch.cat(k, dim=2), torch.cat(v, dim=2)) for k, v in inputs]


# ---------------------------------------------------------------------------------------------------- merge math
def test_merging_identical_layers_restores_them():
    x, v = torch.randn(B, H, 64, D), torch.randn(B, H, 64, D)
    pair = MergedPair(t=0.6, retain=0.0, block=16)
    pair.merge(x, v, x.clone(), v.clone())
    for member in (0, 1):
        keys, values = pair.restore(member)
        torch.testing.assert_close(keys, x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values, v, rtol=1e-6, atol=1e-6)


def test_slerp_endpoints_and_distance():
    u_a, _ = unit(torch.randn(5, D))
    u_b, _ = unit(torch.randn(5, D))
    torch.testing.assert_close(slerp(u_a, u_b, 0.0)[0], u_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slerp(u_a, u_b, 1.0)[0], u_b, rtol=1e-5, atol=1e-5)
    direction, dist = slerp(u_a, u_b, 0.6)
    torch.testing.assert_close(direction.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(dist, torch.acos((u_a * u_b).sum(-1)) / math.pi)
    assert float(slerp(u_a, -u_a, 0.5)[1].min()) > 0.99  # antiparallel: distance 1, no NaN
    assert not torch.isnan(slerp(u_a, -u_a, 0.5)[0]).any()


def test_retained_tokens_are_the_most_distinct_and_restored_bit_exactly():
    ka, va, kb, vb = (torch.randn(B, H, 32, D) for _ in range(4))
    pair = MergedPair(t=0.6, retain=0.25, block=16)  # 4 of every 16 tokens
    pair.merge(ka, va, kb, vb)
    assert pair.key_index.shape == (B, H, 8)
    _, dist = slerp(unit(ka)[0], unit(kb)[0], 0.6)
    top = dist.view(B, H, 2, 16).topk(4, dim=-1).indices + torch.tensor([0, 16]).view(1, 1, 2, 1)
    assert torch.equal(pair.key_index.long(), top.flatten(2).sort(-1).values)
    for member, (k, v) in enumerate(((ka, va), (kb, vb))):
        keys, values = pair.restore(member)
        idx = pair.key_index.long().unsqueeze(-1).expand(-1, -1, -1, D)
        assert torch.equal(keys.gather(2, idx), k.gather(2, idx))
        vidx = pair.value_index.long().unsqueeze(-1).expand(-1, -1, -1, D)
        assert torch.equal(values.gather(2, vidx), v.gather(2, vidx))
        assert not torch.equal(keys, k)  # the others are merged


# ---------------------------------------------------------------------------------------------------- wiring, bytes
def test_share_returns_the_producers_tensors():
    model = tiny_llama6()
    cache = CrossLayerCache(model.config, share={3: 2, 5: 3})  # 5 -> 3 -> 2: a chain reads its first producer
    assert cache.share == {3: 2, 5: 2}
    feed(cache, 6, 10, 5)
    k2, v2 = cache.layers[2].read()
    for consumer in (3, 5):
        k, v = cache.layers[consumer].read()
        assert k is k2 and v is v2
    out_k, _ = cache.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), 0)
    assert cache.layers[3].state_names == () and cache.get_seq_length() == 11


@pytest.mark.parametrize("dtype, bits", [(torch.float32, None), (torch.bfloat16, None)])
def test_bytes_drop_as_claimed(dtype, bits):
    model = tiny_llama6()
    sinks, window, block, retain, T = 4, 8, 16, 0.25, 100
    cache = CrossLayerCache(
        model.config,
        pairs=[[2, 3], [4, 5]],
        share={1: 0},
        t=0.6,
        retain=retain,
        window=window,
        block=block,
        sinks=sinks,
    )
    g = torch.Generator().manual_seed(0)
    dyn = DynamicCache(config=model.config)
    for _ in range(0, T, 10):
        for layer in range(6):
            k, v = (torch.randn(B, H, 10, D, generator=g).to(dtype) for _ in range(2))
            cache.update(k, v, layer)
            dyn.update(k, v, layer)
    e = torch.tensor([], dtype=dtype).element_size()
    merged = (T - sinks - window) // block * block  # 80
    kept = merged // block * round(retain * block)  # 20
    unmerged = T - merged  # sinks + recent window, per layer
    per_pair = (
        B * H * (2 * merged * D * e + merged * 4 * e + 4 * kept * D * e + 2 * kept * 4 + 2 * 2 * unmerged * D * e)
    )
    stored = B * H * T * D * 2 * e
    assert cache_nbytes(cache) == 1 * stored + 2 * per_pair  # layer 0 stored, 1 shares it, 2 pairs
    assert cache_nbytes(dyn) == 6 * stored
    # the planner's estimate is the asymptotic pair cost
    assert pair_fraction(D, retain, block) == pytest.approx((2 * D + 4 + 4 * D * 0.25 + 4 * 0.25) / (4 * D))


def test_quantized_storage_composes():
    model = tiny_llama6()
    T = 200
    full = CrossLayerCache(model.config, pairs=[[2, 3], [4, 5]], window=8, block=16)
    quant = CrossLayerCache(
        model.config, pairs=[[2, 3], [4, 5]], window=8, block=16, bits=4, group_size=16, residual_length=16
    )
    inputs = feed(full, 6, T, 20)
    feed(quant, 6, T, 20)
    assert cache_nbytes(quant) < 0.45 * cache_nbytes(full)
    assert quant.layers[3].pair.directions.quantized_length > 0
    for layer in (0, 3):  # quantized restore stays close to the full-precision one
        kq, _ = quant.layers[layer].read()
        kf, _ = full.layers[layer].read()
        assert kq.shape == kf.shape == inputs[layer][0].shape
        assert float((kq - kf).norm() / kf.norm()) < 0.15


def test_beam_reorder_permutes_merged_and_shared_layers_once():
    model = tiny_llama6()
    cache = CrossLayerCache(model.config, pairs=[[2, 3]], share={5: 4}, window=4, block=8)
    feed(cache, 6, 40, 8)
    before = [cache.layers[i].read() for i in range(6)]
    assert cache.layers[3].pair.length > 0
    cache.reorder_cache(torch.tensor([1, 0]))
    for i in range(6):
        k, v = cache.layers[i].read()
        assert torch.equal(k, before[i][0].flip(0)) and torch.equal(v, before[i][1].flip(0)), f"layer {i}"


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pairs": [[4, 40]]}, r"pairs: layer 40 is out of range.*accepted: the full_attention layers 0..5"),
        ({"pairs": [[3, 3]]}, r"pairs: \[3, 3\] must list two different layers"),
        ({"pairs": [[2, 3], [3, 4]]}, r"pairs: layer 3 appears twice"),
        ({"share": {3: 3}}, r"share: consumer 3 -> producer 3.*accepted producers for 3: \[0, 1, 2\]"),
        ({"share": {2: 4}}, r"share: consumer 2 -> producer 4: a consumer must read an earlier layer"),
        ({"share": {2: 3, 3: 2}}, r"share: consumer 2 -> producer 3.*no cycles"),
        ({"share": {-1: 0}}, r"share \(consumer\): layer -1 is out of range"),
        ({"pairs": [[2, 3]], "share": {3: 1}}, r"share: consumer 3 is already in pair \[2, 3\]"),
        ({"mode": "evict"}, r"mode='evict' is not supported; accepted values: \['merge', 'share'\]"),
        ({"t": 1.5}, r"t=1.5 must be a number in \[0.0, 1.0\]"),
        ({"retain": -0.1}, r"retain=-0.1 must be a number in"),
        ({"window": -1}, r"window=-1 must be an integer >= 0"),
        ({"bits": 3}, r"bits=3 is not supported; accepted values: \[2, 4, 8\]"),
        ({"bits": 4, "group_size": 5}, r"group_size=5 must divide head_dim=16"),
        ({"plan": "nonexistent"}, r"plan='nonexistent' is not .*accepted names"),
        ({"plan": {"merges": []}, "pairs": [[2, 3]]}, r"either plan= or start/pairs/share"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossLayerCache(tiny_llama6().config, **kwargs)


def test_sliding_layers_cannot_merge_or_share():
    config = tiny_gemma6().config
    with pytest.raises(
        ValueError,
        match=r"pairs: layer 2 is a sliding_attention layer.*accepted: the full_attention "
        r"layers \[1, 3, 5\]",
    ):
        CrossLayerCache(config, pairs=[[1, 2]])
    with pytest.raises(ValueError, match=r"share \(producer\): layer 0 is a sliding_attention layer"):
        CrossLayerCache(config, share={1: 0})
    cache = CrossLayerCache(config, start=0)  # default pairs use full layers only
    assert cache.pairs == [(1, 3)]


def test_plan_round_trip_and_other_model_refused(tmp_path):
    llama, gemma = tiny_llama6(), tiny_gemma6()
    plan = CrossLayerPlan.for_model(ModelGeometry.of(llama.config), merges=[[2, 3]], shares={5: 4}, info={"x": 1})
    for name in ("plan.json", "plan.yaml"):
        plan.save(str(tmp_path / name))
        loaded = CrossLayerPlan.load(str(tmp_path / name))
        assert loaded == plan
        cache = CrossLayerCache(llama.config, plan=str(tmp_path / name))
        assert cache.pairs == [(2, 3)] and cache.share == {5: 4}
    with pytest.raises(
        ValueError,
        match=r"plan was made for model_type='llama', 6 layers.*but this cache is for "
        r"model_type='gemma3_text'",
    ):
        CrossLayerCache(gemma.config, plan=plan.to_dict())


# ---------------------------------------------------------------------------------------------------- generate modes
def _generate(model, ids, cache, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("do_sample", False)
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **{cache_kwarg(model): cache}, **kwargs
    )


@pytest.mark.parametrize("make", [tiny_llama6, tiny_gemma6])
def test_generate_modes_tiny(make):
    model = make()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    exact = dict(retain=1.0, window=4, block=8, start=1)  # every token retained: restores exactly
    ref = _generate(model, ids, DynamicCache(config=model.config))
    cache = CrossLayerCache(model, **exact)
    assert torch.equal(_generate(model, ids, cache), ref)
    assert cache.layers[cache.pairs[0][1]].pair.length > 0
    cache.reset()  # reuse for the same prompt
    assert cache.get_seq_length() == 0
    assert torch.equal(_generate(model, ids, cache), ref)
    # continuation: a second generate extends the first one's cache
    first = _generate(model, ids, cache := CrossLayerCache(model, **exact), max_new_tokens=6)
    second = _generate(model, torch.cat([first, ref[:, 46:47]], dim=1), cache, max_new_tokens=5)
    assert torch.equal(second[:, :52], ref[:, :52]) and second.shape[1] == 52
    # beam search: lossless, it equals DynamicCache's; lossy, every beam scores as its tokens teacher-forced through
    # the same kind of cache (a beam reordered wrongly would read another beam's merged/shared history)
    assert torch.equal(
        _generate(model, ids, CrossLayerCache(model, **exact), num_beams=3),
        _generate(model, ids, DynamicCache(config=model.config), num_beams=3),
    )
    mask = torch.ones_like(ids)
    for lossy in (dict(window=4, block=8, start=1), dict(mode="share", start=1)):
        assert_beams_match_teacher_forcing(model, lambda lossy=lossy: CrossLayerCache(model, **lossy), ids, mask)
    # sampling: lossless, the same seed samples DynamicCache's tokens; lossy, every sampled token is among the top 5
    # of the distribution teacher-forced through a fresh cache of the same kind
    sample = dict(do_sample=True, top_k=5, min_new_tokens=12)
    torch.manual_seed(0)
    ref_sampled = _generate(model, ids, DynamicCache(config=model.config), **sample)
    torch.manual_seed(0)
    assert torch.equal(_generate(model, ids, CrossLayerCache(model, **exact), **sample), ref_sampled)
    sampled = assert_sampled_from_cache(model, lambda: CrossLayerCache(model, mode="share", start=1), ids, mask, 12)
    assert not torch.equal(sampled, ref_sampled[:, 40:])  # lossy: not DynamicCache's tokens


def test_batch_with_left_padding_matches_single_rows():
    model = tiny_llama6()
    g = torch.Generator().manual_seed(2)
    long, short = torch.randint(3, 128, (1, 40), generator=g), torch.randint(3, 128, (1, 30), generator=g)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 10, dtype=torch.long), short], dim=1)])
    mask = (torch.arange(40) >= torch.tensor([[0], [10]])).long()
    settings = dict(retain=1.0, window=4, block=8, start=1)
    key = cache_kwarg(model)
    batch = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        **{key: CrossLayerCache(model, **settings)},
    )
    for row, single in ((0, long), (1, short)):
        alone = _generate(model, single, CrossLayerCache(model, **settings), max_new_tokens=8)
        assert torch.equal(batch[row, -8:], alone[0, -8:])


def test_registered():
    cache = build_cache("crosslayer", tiny_llama6(), retain=0.1)
    assert isinstance(cache, CrossLayerCache) and cache.retain == 0.1


# ---------------------------------------------------------------------------------------------------- real models
def _real_modes(model, tok, exact: bool = False, **settings):
    """Batch (rows equal the same prompts run alone: the unpadded row always, every row when `exact`), continuation,
    reset, beam search and sampling (scores / top-k teacher-forced through the same kind of cache) on a real model."""
    key = cache_kwarg(model)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 12, "Python lists are"]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True)
    common = dict(max_new_tokens=8, pad_token_id=tok.pad_token_id)
    out = model.generate(**batch, do_sample=False, **common, **{key: CrossLayerCache(model, **settings)})
    for row in range(2) if exact else range(1):
        alone = model.generate(**tok(prompts[row : row + 1], return_tensors="pt"), do_sample=False, **common,
                               **{key: CrossLayerCache(model, **settings)})
        assert torch.equal(out[row, -8:], alone[0, -8:])
    single = tok(prompts[:1], return_tensors="pt")
    cache = CrossLayerCache(model, **settings)
    first = model.generate(**single, do_sample=False, **common, **{key: cache})
    more = model.generate(first, attention_mask=torch.ones_like(first), do_sample=False, **common, **{key: cache})
    assert torch.equal(more[:, : first.shape[1]], first) and cache.get_seq_length() == more.shape[1] - 1
    cache.reset()
    again = model.generate(**single, do_sample=False, **common, **{key: cache})
    assert torch.equal(again, first)
    make = lambda: CrossLayerCache(model, **settings)
    assert_beams_match_teacher_forcing(model, make, single.input_ids, single.attention_mask, new_tokens=6, beams=2)
    assert_sampled_from_cache(model, make, single.input_ids, single.attention_mask, new_tokens=6, top_k=10)
    return first


@pytest.mark.model
def test_smollm2_generate_modes_and_exactness(smollm2_fp32):
    model, tok = smollm2_fp32
    _real_modes(model, tok, window=16, block=32)
    _real_modes(model, tok, mode="share", bits=4)
    exact = _real_modes(model, tok, exact=True, retain=1.0, window=16, block=32)
    single = tok(["The quick brown fox jumps over the lazy dog. " * 12], return_tensors="pt")
    ref = model.generate(**single, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(exact, ref)  # every merged token retained: the merged cache restores exactly


@pytest.mark.model
def test_gemma3_generate_modes(gemma3):
    model, tok = gemma3
    cache = CrossLayerCache(model, start=0)
    assert cache.pairs == [(5, 11)]  # full-attention layers 5, 11, 17: sliding layers keep their window
    _real_modes(model, tok, start=0, window=16, block=32)
    _real_modes(model, tok, share={17: 11}, bits=4)
    with pytest.raises(ValueError, match="sliding_attention"):
        CrossLayerCache(model, pairs=[[4, 5]])


def test_crosslayer_modules_import_without_a_cycle():
    """Every import between the crosslayer modules (lazy ones included) points one way: the plan record does not
    reach back into the cache that reads it, the calibration sits on top."""
    import ast
    import pathlib

    import kvpress_lite.crosslayer as package

    folder = pathlib.Path(package.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text())
        graph[name] = {n.module for n in ast.walk(tree)
                       if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module in modules}
    assert graph["plan"] == {"shipped_plans"} and "calibration" in graph and "cache" not in graph["plan"]
    done, visiting = set(), []

    def visit(name):
        assert name not in visiting, f"import cycle: {' -> '.join([*visiting, name])}"
        if name not in done:
            visiting.append(name)
            for dep in graph[name]:
                visit(dep)
            visiting.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)
