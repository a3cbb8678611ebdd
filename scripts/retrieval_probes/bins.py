# ruff: noqa  (one-off diagnosis probes, kept as run for docs/eviction-leaderboard.md)
# KVzip re-read scores per 256-token bin and top-scored tokens per full layer (issue 19).
#   OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/retrieval_probes/bins.py "[{}]"
import sys

from kvpress_lite import build_cache
from kvpress_lite._compat import cache_kwarg
from kvpress_lite.eviction import EvictionLayer
from needle_setup import model, sample, tok

s, ids = sample(0)
L = ids.shape[1]
for kw in eval(sys.argv[1]):
    cache = build_cache("kvzip", model, ratio=1.0, **kw)
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id, **{cache_kwarg(model): cache})
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, EvictionLayer): continue
        sc = layer.scores[0, 0][:L]
        thr = sc.kthvalue(L // 2).values
        print(kw, "layer", i, "median per 256-bin", [f"{sc[b:b+256].median():.3f}" for b in range(0, L, 256)], "kept@0.5 per bin", [f"{(sc[b:b+256] > thr).float().mean():.2f}" for b in range(0, L, 256)])
        top = sc.topk(12).indices.sort().values
        print("   top tokens", [(int(p), tok.decode(ids[0, p]), round(float(sc[p]), 3)) for p in top])
        print("   first 12 scores", [round(float(x),3) for x in sc[:12]], "toks", [tok.decode(t) for t in ids[0,:12]])
    cache.detach()
