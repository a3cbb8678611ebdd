# ruff: noqa  (one-off diagnosis probes, kept as run for docs/eviction-leaderboard.md)
# Probe used for docs/eviction-leaderboard.md "Retrieval at ratio 0.5" (issue 19): per full layer, share of the asked
# value / needle / question / first 64 tokens kept after generate. Usage:
#   OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/retrieval_probes/probe2.py "[(\"snapkv\", dict(ratio=0.5, kernel=15))]" 2 6 7
import sys

import torch

from eval.diagnose import token_span
from kvpress_lite import build_cache
from kvpress_lite._compat import cache_kwarg
from kvpress_lite.eviction import EvictionLayer
from needle_setup import model, recipe, sample, tok

configs = eval(sys.argv[1])
for index in [int(x) for x in sys.argv[2:]]:
    s, ids = sample(index)
    L = ids.shape[1]
    value = s.answer.split()[0]
    at = s.prompt.index(s.needle) + s.needle.index(value)
    vs, ve = token_span(tok, s.prompt, at, len(value), not recipe.chat)
    ns, ne = token_span(tok, s.prompt, s.prompt.index(s.needle), len(s.needle), not recipe.chat)
    qat = s.prompt.rindex("What is the special")
    qs, _ = token_span(tok, s.prompt, qat, 5, not recipe.chat)
    print(f"sample {index} L={L} needle {ns}-{ne} value {vs}-{ve} question from {qs} answer {s.answer}")
    for name, kw in configs:
        cache = build_cache(name, model, **kw)
        out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id, **{cache_kwarg(model): cache})
        print(name, kw, repr(tok.decode(out[0, L:])))
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, EvictionLayer): continue
            pos = layer.positions[0, 0].long()
            keep = torch.zeros(layer.length, dtype=torch.bool); keep[pos] = True
            print(f"  layer {i} P={pos.numel()} value {keep[vs:ve].float().mean():.0%} needle {keep[ns:ne].float().mean():.0%} question {keep[qs:L].float().mean():.0%} first64 {keep[:64].float().mean():.0%}")
        cache.detach()
