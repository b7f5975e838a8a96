"""The scoring cores of eval's axes and RL's rewards (eval/axes.py), against values worked by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch

from picoalign.data import stories
from picoalign.eval.axes import (
    asked_paragraphs,
    content_words,
    distinct_n,
    finished,
    fluency,
    paragraph_count,
    paragraphs_ok,
    parse_spec,
    repetition,
    spec_coverage,
)

PROMPT = stories.format_prompt(stories.StorySpec(
    title="The Salt Bell", setting="a ferry crossing a lake at midnight", protagonist="Mara, a locksmith",
    supporting_character="a boy who collects keys", important_object="a bell with no clapper",
    taboo_rule="never turn around when the bell rings", twist="the supporting character died years ago"))


def test_parse_spec_reads_the_fields_from_the_prompt_text_and_chat_messages():
    spec = parse_spec(PROMPT)
    assert spec == {"protagonist": "Mara, a locksmith", "supporting_character": "a boy who collects keys",
                    "important_object": "a bell with no clapper", "setting": "a ferry crossing a lake at midnight",
                    "taboo_rule": "Never turn around when the bell rings"}
    assert parse_spec([{"role": "user", "content": PROMPT}]) == spec
    assert parse_spec("Tell me a joke.") == {}


def test_spec_coverage_by_hand():
    """Content words (stopwords out, plural -s off): supporting {boy, collect, key}, object {bell,
    clapper}, setting {ferry, crossing, lake, midnight}, taboo {turn, around, bell, ring}.
    The story names Mara (1), says "keys" and "boy" (2/3), "bell" (1/2), "lake" (1/4) and
    "bell", "rings" (2/4): (1 + 2/3 + 1/2 + 1/4 + 1/2) / 5 = 0.58333."""
    story = "Mara heard the bell ring twice. The boy dropped his keys into the lake."
    assert content_words("the boy who collects keys") == {"boy", "collect", "key"}
    assert spec_coverage(PROMPT, story) == pytest.approx((1 + 2 / 3 + 1 / 2 + 1 / 4 + 1 / 2) / 5)
    assert spec_coverage(PROMPT, "It was a dark and stormy night.") == 0.0
    assert spec_coverage("Tell me a joke.", "Knock knock.") is None


def test_the_training_story_uses_the_whole_spec():
    rng = random.Random(0)
    spec = stories.random_spec(rng)
    assert spec_coverage(stories.format_prompt(spec), stories.write_story(spec, rng)) == 1.0


def test_paragraphs_title_line_and_asked_range():
    """The training answers: a title line and three paragraphs -> 3 paragraphs, inside 2-4."""
    rng = random.Random(1)
    spec = stories.random_spec(rng)
    story = stories.write_story(spec, rng)
    assert paragraph_count(story) == 3 and paragraphs_ok(story, stories.format_prompt(spec)) == 1.0
    assert asked_paragraphs(PROMPT) == (2, 4)
    assert asked_paragraphs("Write 3 paragraphs.") == (3, 3)
    assert asked_paragraphs(None) == (2, 4)
    one = "The Bell\n\nMara heard it once and ran."
    assert paragraph_count(one) == 1 and paragraphs_ok(one, PROMPT) == 0.0
    five = "\n".join(f"Line {i} ends here." for i in range(5))
    assert paragraph_count(five) == 5 and paragraphs_ok(five) == 0.0


def test_repetition_and_distinct_by_hand():
    """"a b c d a b c d" has 5 word 4-grams: abcd, bcda, cdab, dabc, abcd -> 4 distinct, rep-4 =
    1/5; 7 bigrams ab bc cd da ab bc cd -> 4 distinct, distinct-2 = 4/7."""
    text = "a b c d a b c d"
    assert repetition(text) == pytest.approx(1 / 5)
    assert distinct_n(text, 2) == pytest.approx(4 / 7)
    assert repetition("The cat sat on the mat.") == 0.0 and distinct_n("The cat sat.", 2) == 1.0
    assert repetition("too short") == 0.0 and distinct_n("", 2) == 0.0


def test_finished_from_reason_or_token_ids():
    assert finished("stop") == 1.0 and finished("length") == 0.0
    assert finished(token_ids=[5, 6, 2], end_ids=[2], max_new_tokens=3) == 1.0  # ended by end-of-turn
    assert finished(token_ids=[5, 6, 7], end_ids=[2], max_new_tokens=3) == 0.0  # hit the cap
    assert finished(token_ids=[5, 6], end_ids=[2], max_new_tokens=3) == 1.0  # a stop string cut it
    with pytest.raises(ValueError):
        finished()


class CharTokenizer:
    """One token per character of "ab"; BOS = 2, pad = 3."""

    bos_token_id, eos_token_id, pad_token_id = 2, None, 3

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": ["ab".index(c) for c in text]}


class Bigram(torch.nn.Module):
    """Logits of the next token = a row of `table` picked by the current token (vocabulary 4)."""

    def __init__(self, table):
        super().__init__()
        self.head = torch.nn.Linear(4, 4, bias=False)
        self.table = torch.tensor(table, dtype=torch.float32)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_fluency_by_hand_on_a_bigram_model():
    """After BOS the logits are [ln 3, 0, -inf, -inf]: p(a) = 3/4, p(b) = 1/4. After "a":
    [0, 0, -inf, -inf], p = 1/2 each. After "b": p(a) = 1/4 (logits [0, ln 3]).
    "ab": (ln 3/4 + ln 1/2) / 2;  "ba": (ln 1/4 + ln 1/4) / 2 = ln 1/4;  "": NaN."""
    inf = float("inf")
    model = Bigram([[0, 0, -inf, -inf], [0, math.log(3), -inf, -inf],
                    [math.log(3), 0, -inf, -inf], [0, 0, 0, 0]])
    got = fluency(model, CharTokenizer(), ["ab", "ba", ""], batch_size=2)
    assert got[0] == pytest.approx((math.log(3 / 4) + math.log(1 / 2)) / 2)
    assert got[1] == pytest.approx(math.log(1 / 4))
    assert math.isnan(got[2])


def test_fluency_batched_equals_one_at_a_time(tiny_llama, plain_tokenizer):
    """Right padding and the logit budget change nothing: batches of 3 = one row per forward."""
    answers = ["Mara heard the bell.", "The boy", "Nobody at the station would say whether it was true."]
    batched = fluency(tiny_llama, plain_tokenizer, answers, batch_size=3)
    single = fluency(tiny_llama, plain_tokenizer, answers, batch_size=1)
    squeezed = fluency(tiny_llama, plain_tokenizer, answers, batch_size=3, logit_budget=1)
    assert batched == pytest.approx(single, abs=1e-5) and squeezed == pytest.approx(single, abs=1e-5)
    ids = [plain_tokenizer.bos_token_id] + plain_tokenizer(answers[0], add_special_tokens=False)["input_ids"]
    lp = tiny_llama(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    assert batched[0] == pytest.approx(lp.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item(), abs=1e-5)
    assert all(v < 0 for v in batched)
