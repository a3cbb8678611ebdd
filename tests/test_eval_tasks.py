"""Task generators: prompt length, needle depth, answers recoverable by exact match, seeded determinism."""

from __future__ import annotations

import random
import re

import pytest

from eval.scoring import exact_match
from eval.tasks import TASKS, Prompter, get_task
from eval.zoo import tiny_tokenizer

# Every needle a task can insert (stripped before measuring the depth of the queried one in pure haystack).
NEEDLES = re.compile(
    r"The pass key is \d+\. Remember it\. \d+ is the pass key\.|One of the special magic numbers for \S+ is: \d+\."
    r"|VAR [A-Z]{5} = (?:VAR [A-Z]{5}|\d+)\."
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sample(name, tokenizer, length, depth, seed="s0", chat=False, haystack=None):
    entry = get_task(name)
    return entry.task.sample(entry.params(), Prompter(tokenizer, chat), length, depth,
                             haystack or entry.task.default_haystack, random.Random(seed), 0)


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("length", [512, 1500])
def test_prompt_length_and_needle_depth(tokenizer, name, length):
    for depth in (0.0, 0.3, 0.75, 1.0):
        sample = _sample(name, tokenizer, length, depth)
        tokens = len(tokenizer(sample.prompt)["input_ids"])
        assert length - 24 <= tokens <= length, (name, depth, tokens)
        assert sample.meta["prompt_tokens"] == tokens
        assert sample.context in sample.prompt and sample.needle in sample.context
        at = sample.context.index(sample.needle)
        before = NEEDLES.sub("", sample.context[:at])
        after = NEEDLES.sub("", sample.context[at + len(sample.needle) :])
        measured = _tokens(tokenizer, before) / (_tokens(tokenizer, before) + _tokens(tokenizer, after))
        assert abs(measured - depth) <= 0.04, (name, depth, measured)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answer_in_context_and_recoverable_by_exact_match(tokenizer, name):
    entry = get_task(name)
    sample = _sample(name, tokenizer, 700, 0.5)
    parts = sample.answer.split()
    assert parts and all(part in sample.context for part in parts)
    ideal = " " + ", ".join(reversed(parts)) + ". More text 123 follows."  # how a model states the answer
    extracted = entry.task.extract(ideal, entry.params())
    assert extracted == sample.answer
    assert exact_match([extracted], [sample.answer]) == {"exact_match": 1.0}
    assert exact_match([entry.task.extract(" no idea", entry.params())], [sample.answer]) == {"exact_match": 0.0}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_seeded_determinism(tokenizer, name):
    a, b = _sample(name, tokenizer, 600, 0.5, "seed-a"), _sample(name, tokenizer, 600, 0.5, "seed-a")
    c = _sample(name, tokenizer, 600, 0.5, "seed-b")
    assert (a.prompt, a.answer, a.meta) == (b.prompt, b.answer, b.meta)
    assert a.answer != c.answer


def test_niah_multikey_has_distractors_and_multivalue_asks_all(tokenizer):
    sample = _sample("niah_multikey", tokenizer, 900, 0.5)
    assert len(re.findall(r"special magic numbers for \S+ is: \d{7}\.", sample.context)) == 4
    assert re.fullmatch(r"\d{7}", sample.answer)
    multi = _sample("niah_multivalue", tokenizer, 900, 0.5)
    assert len(multi.answer.split()) == 4 and "What are all the special magic numbers" in multi.prompt


def test_real_text_haystack_and_too_short_length(tokenizer):
    sample = _sample("passkey", tokenizer, 600, 0.5, haystack="pydoc")
    assert "The grass is green" not in sample.context
    with pytest.raises(ValueError, match="length=40"):
        _sample("niah", tokenizer, 40, 0.5)


def test_chat_template_prompt_ends_with_answer_prefix():
    from transformers import AutoTokenizer

    from kvpress_lite.models import embedded_model_path

    path = embedded_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1])
    sample = _sample("passkey", tok, 1024, 0.5, chat=True)
    assert sample.prompt.startswith("<|im_start|>") and sample.prompt.endswith("The pass key is")
    assert 1000 <= len(tok(sample.prompt, add_special_tokens=False)["input_ids"]) <= 1024
    plain = _sample("passkey", tok, 1024, 0.5)
    assert "<|im_start|>" not in plain.prompt and plain.prompt.endswith("What is the pass key?\nThe pass key is")
    with pytest.raises(ValueError, match="chat template"):
        Prompter(tiny_tokenizer(), chat=True)
