"""Plans computed by `kvpress_lite.crosslayer.calibrate` for the embedded models (see docs/crosslayer.md).

Made with runs of `calibrate(model, ids, prefix=256, chunk=16, target_ratio=1.6, max_ppl_increase=0.05, verify=12)`
on the first 384 tokens of the last 40k characters of pydoc text (SmolLM2 bf16, Gemma-3-270M fp32, 1 CPU thread).
`info.candidates` of the calibration (every measured candidate) is dropped here; `info` keeps the summary.
Gemma-3-270M: every candidate (2 merges, 3 shares among layers 5, 11, 17) costs more than 5% on its own
(+15% to +512% perplexity), so its plan is empty: the calibrated answer is not to merge.
"""

SHIPPED_PLANS: dict[str, dict] = {
    "smollm2-135m": {
        "model_type": "llama",
        "num_layers": 30,
        "kv_heads": 3,
        "head_dim": 64,
        "layer_types": ["full_attention"] * 30,
        "merges": [[0, 1], [5, 6], [15, 16], [24, 25], [28, 29]],
        "shares": {},
        "info": {
            "calibration_tokens": 384,
            "prefix": 256,
            "chunk": 16,
            "settings": {"t": 0.6, "retain": 0.05, "window": 32, "block": 64, "sinks": 4},
            "target_ratio": 1.6,
            "max_ppl_increase": 0.05,
            "estimated_ratio": 1.17,
            "base_nll": 2.05687,
            "plan_dnll": -0.02128,
            "plan_ppl_change": -0.02106,
            "cheapest_candidates": [
                {"kind": "merge", "layers": [5, 6], "dnll": -0.05488},
                {"kind": "share", "layers": [5, 0], "dnll": -0.04637},
                {"kind": "merge", "layers": [0, 1], "dnll": -0.03741},
                {"kind": "merge", "layers": [6, 7], "dnll": -0.03375},
                {"kind": "share", "layers": [4, 0], "dnll": -0.03858},
                {"kind": "share", "layers": [8, 0], "dnll": -0.01807},
            ],
        },
    },
    "gemma3-270m": {
        "model_type": "gemma3_text",
        "num_layers": 18,
        "kv_heads": 1,
        "head_dim": 256,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,  # full layers 5, 11, 17
        "merges": [],
        "shares": {},
        "info": {
            "calibration_tokens": 384,
            "prefix": 256,
            "chunk": 16,
            "settings": {"t": 0.6, "retain": 0.05, "window": 32, "block": 64, "sinks": 4},
            "target_ratio": 1.6,
            "max_ppl_increase": 0.05,
            "estimated_ratio": 1.0,
            "base_nll": 1.85951,
            "plan_dnll": 0.0,
            "plan_ppl_change": 0.0,
            "cheapest_candidates": [
                {"kind": "share", "layers": [17, 11], "dnll": 0.14044},
                {"kind": "share", "layers": [17, 5], "dnll": 0.18001},
                {"kind": "merge", "layers": [5, 11], "dnll": 0.47066},
                {"kind": "merge", "layers": [11, 17], "dnll": 0.79548},
                {"kind": "share", "layers": [11, 5], "dnll": 1.81231},
            ],
        },
    },
}
