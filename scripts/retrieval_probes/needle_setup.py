"""What every retrieval probe starts from: Gemma-3-270M as `recipes/leaderboard.yaml` loads it for the 2k multi-key
needle, and a sample's prompt as token ids (one torch thread)."""

import torch

from eval import zoo
from eval.config import load_recipe
from eval.execute import make_sample
from eval.runs import plan
from eval.tasks import Prompter

torch.set_num_threads(1)
recipe = load_recipe("recipes/leaderboard.yaml", ["perplexity=null", "tasks.niah_multikey.lengths=[2048]"])
run = {r.cache.label: r for r in plan(recipe) if r.cell == "niah_multikey-2048"}["kvzip-ratio0.5"]
model, tok = zoo.load(run.model, run.dtype, recipe.device, recipe.attn_implementation)
prompter = Prompter(tok, recipe.chat)


def sample(index: int):
    """(the task's sample `index`, its prompt's ids `[1, L]`)."""
    s = make_sample(run, tok, index)
    return s, torch.tensor([prompter.encode(s.prompt)])
