# ruff: noqa  (one-off diagnosis probes, kept as run for docs/eviction-leaderboard.md)
# KVzip re-read sanity check (issue 19): top-1 copy accuracy of the re-read, with and without the paper's
# "Repeat the previous context exactly." prefix, and the share of attention mass on the context per full layer.
#   OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/retrieval_probes/copyprobe.py
import torch

from kvpress_lite import build_cache
from kvpress_lite._compat import Cache, cache_kwarg, scratch_copy
from kvpress_lite.eviction import EvictionLayer, observe
from kvpress_lite.eviction import reread as R
from needle_setup import model, sample, tok

share = {}
orig = R._ReaderLayer.attend
def attend(self, base, module, query, key, value, attention_mask, **kw):
    out = orig(self, base, module, query, key, value, attention_mask, **kw)
    P = self.keys.shape[-2]
    m = observe.attention_mass(query, key, attention_mask, None, kw.get("scaling"), kw.get("softcap"), None, None, "sum")
    share.setdefault(self.layer_idx, []).append((m[..., :P].sum() / m.sum()).item())
    return out
R._ReaderLayer.attend = attend
s, ids = sample(0)
L = ids.shape[1]
pre = torch.tensor([tok("\n\nRepeat the previous context exactly.\n", add_special_tokens=False)["input_ids"]])
for prefix in (None, pre):
    cache = build_cache("kvzip", model, ratio=0.5)
    model(input_ids=ids, **{cache_kwarg(model): cache})
    readers = {i: R._ReaderLayer(l) for i, l in enumerate(cache.layers) if isinstance(l, EvictionLayer)}
    share.clear()
    for start in (0, 1024):
        chunk = ids[:, start:start+256]
        if start == 0: chunk = chunk[:, 1:]  # drop bos
        inp = chunk if prefix is None else torch.cat([prefix, chunk], 1)
        layers = [readers.get(i) or scratch_copy(l) for i, l in enumerate(cache.layers)]
        q = inp.shape[1]
        out = model(input_ids=inp, attention_mask=torch.ones(1, L + q, dtype=torch.long), position_ids=torch.arange(L, L+q)[None], use_cache=True, **{cache_kwarg(model): Cache(layers=layers)})
        pred = out.logits[0].argmax(-1)
        n = chunk.shape[1]
        acc = (pred[-n:-1] == chunk[0, 1:]).float().mean().item()
        print("prefix" if prefix is not None else "noprefix", start, f"copy acc {acc:.2f}", {k: [round(x,2) for x in v] for k, v in share.items()})
        share.clear()
    cache.detach()
