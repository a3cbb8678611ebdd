"""kvpress_lite eval harness: perplexity through the cache, long-context tasks, recipes and reports."""
