"""train/batching.py: the prompt/answer boundary, loss masks, packed rows, prefix sharing.

Both tokenizers of conftest.py are used: the ChatML one (eos = pad = `<|im_end|>`, no BOS) and the
plain one (no chat template, BOS `<s>` prepended, eos = pad = `<|endoftext|>`). Log-probs from the
packed rows (custom 4-D masks, kept-logit positions) are checked against a plain causal forward
of one sequence at a time.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import naive_answer_logps

from picoalign.train.batching import (
    Encoded,
    RowBuilder,
    encode,
    encode_conversation,
    forward_logps,
    pack_examples,
    pack_pairs,
    stack_rows,
)
from picoalign.train.losses import sequence_logps

PROMPT = "Tell me a story about the lighthouse keeper."
ANSWER = "Once upon a time, the keeper heard the bell at midnight."


@pytest.fixture(params=["chat", "plain"])
def tok(request, chat_tokenizer, plain_tokenizer):
    return chat_tokenizer if request.param == "chat" else plain_tokenizer


def expected_prompt_ids(tok, prompt: str) -> list[int]:
    """The chat template with the generation prompt, or the text with the tokenizer's BOS."""
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
    return [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]


def target_positions(batch) -> torch.Tensor:
    """For each target token, the flat (row-major) position whose logits predict it."""
    kept = batch.keep.flatten().nonzero().squeeze(1)
    return kept[batch.rows]


# ---------------------------------------------------------------- encode


def test_encode_prompt_is_the_rendered_prompt(tok):
    ex = encode(tok, PROMPT, [ANSWER], max_length=256)
    assert ex.prompt == expected_prompt_ids(tok, PROMPT)
    if tok.chat_template:
        assert tok.decode(ex.prompt).endswith("<|im_start|>assistant\n")
        assert tok.bos_token_id is None
    else:
        assert ex.prompt[0] == tok.bos_token_id == 3
    assert ex.truncated is False


def test_encode_answer_ends_with_end_of_turn(tok):
    """Chat: the answer is the rest of the rendered conversation, `ANSWER<|im_end|>\\n`; the template
    puts a newline after the end-of-turn token, so that newline is the last answer token (TRL
    1.16 scores the same tokens, see test_trl_agreement.py). Plain: `ANSWER` + eos, no BOS."""
    (answer,) = encode(tok, PROMPT, [ANSWER], max_length=256).answers
    text_ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id == tok.pad_token_id
    if tok.chat_template:
        assert answer == text_ids + [tok.eos_token_id] + tok("\n", add_special_tokens=False)["input_ids"]
        assert tok.decode(answer) == ANSWER + "<|im_end|>\n"
        # prompt + answer is exactly the tokenised full conversation
        full = tok.apply_chat_template([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}],
                                       tokenize=True, return_dict=True)["input_ids"]
        assert expected_prompt_ids(tok, PROMPT) + answer == full
    else:
        assert answer == text_ids + [tok.eos_token_id]
        assert tok.bos_token_id not in answer


def test_pack_examples_targets_are_exactly_the_answer(tok):
    ex = encode(tok, PROMPT, [ANSWER], max_length=256)
    batch = pack_examples([ex], pad_id=tok.pad_token_id)
    assert batch.labels.tolist() == ex.answers[0]
    assert batch.seq_index.tolist() == [0] * len(ex.answers[0])
    assert batch.n_seqs == 1 and batch.n_tokens == len(ex.prompt) + len(ex.answers[0])
    # token k of the answer is predicted at the position just before it: the last prompt token first
    positions = target_positions(batch)
    assert positions.tolist() == list(range(len(ex.prompt) - 1, len(ex.prompt) + len(ex.answers[0]) - 1))
    ids = batch.input_ids.flatten()
    assert ids[positions + 1].tolist() == batch.labels.tolist()
    # eos == pad, and still a target: padding is masked by layout, not by comparing ids
    assert tok.eos_token_id in batch.labels.tolist()


def test_truncation_cuts_the_answer_and_keeps_the_prompt(tok):
    full = encode(tok, PROMPT, [ANSWER], max_length=256)
    cut = encode(tok, PROMPT, [ANSWER], max_length=len(full.prompt) + 5)
    assert cut.prompt == full.prompt
    assert cut.answers == [full.answers[0][:5]]
    assert cut.truncated is True
    # exactly fitting is not truncated
    exact = encode(tok, PROMPT, [ANSWER], max_length=len(full.prompt) + len(full.answers[0]))
    assert exact.answers == full.answers and exact.truncated is False


def test_prompt_that_fills_max_length_is_dropped(tok):
    n = len(encode(tok, PROMPT, [ANSWER], max_length=256).prompt)
    assert encode(tok, PROMPT, [ANSWER], max_length=n) is None
    assert encode(tok, PROMPT, [ANSWER], max_length=n + 1) is None  # room for one token: dropped
    assert len(encode(tok, PROMPT, [ANSWER], max_length=n + 2).answers[0]) == 2


def test_truncation_cuts_each_answer_of_a_pair_to_the_same_room(chat_tokenizer):
    ex = encode(chat_tokenizer, PROMPT, [ANSWER, "No."], max_length=256)
    room = len(ex.answers[1]) + 1  # the short answer fits, the long one is cut
    cut = encode(chat_tokenizer, PROMPT, [ANSWER, "No."], max_length=len(ex.prompt) + room)
    assert cut.answers == [ex.answers[0][:room], ex.answers[1]]
    assert cut.truncated is True


# ---------------------------------------------------------------- multi-turn

CONVERSATION = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Hello. What story?"},
    {"role": "user", "content": "The lighthouse keeper."},
    {"role": "assistant", "content": "The keeper heard the bell."},
]


def turn_ids(tok, content: str) -> list[int]:
    return tok(content + "<|im_end|>\n", add_special_tokens=False)["input_ids"]


def test_encode_conversation_targets_every_assistant_turn(chat_tokenizer):
    tok = chat_tokenizer
    ex = encode_conversation(tok, CONVERSATION, max_length=256)
    flat = [t for ids, _ in ex.segments for t in ids]
    assert flat == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    targets = [ids for ids, is_target in ex.segments if is_target]
    assert targets == [turn_ids(tok, "Hello. What story?"), turn_ids(tok, "The keeper heard the bell.")]
    batch = pack_examples([ex], pad_id=tok.pad_token_id)
    assert batch.labels.tolist() == targets[0] + targets[1]
    assert batch.n_seqs == 1
    ids = batch.input_ids.flatten()
    assert ids[target_positions(batch) + 1].tolist() == batch.labels.tolist()
    assert ex.truncated is False


def test_encode_conversation_truncation(chat_tokenizer):
    tok = chat_tokenizer
    full = encode_conversation(tok, CONVERSATION, max_length=256)
    n_before_last = sum(len(ids) for ids, _ in full.segments[:-1])
    cut = encode_conversation(tok, CONVERSATION, max_length=n_before_last + 3)
    assert cut.truncated is True
    assert cut.segments[:-1] == full.segments[:-1] and cut.segments[-1] == (full.segments[-1][0][:3], True)
    # no room for any assistant token: nothing to train on
    first_context = len(full.segments[0][0])
    assert encode_conversation(tok, CONVERSATION, max_length=first_context) is None


def test_conversation_that_exactly_fits_is_not_truncated(chat_tokenizer):
    full = encode_conversation(chat_tokenizer, CONVERSATION, max_length=256)
    n = sum(len(ids) for ids, _ in full.segments)
    exact = encode_conversation(chat_tokenizer, CONVERSATION, max_length=n)
    assert exact.segments == full.segments
    assert exact.truncated is False


def test_conversation_needs_a_chat_template(plain_tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        encode_conversation(plain_tokenizer, CONVERSATION, max_length=256)


# ---------------------------------------------------------------- log-probs against a naive forward


def packed_seq_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(forward_logps(model, batch), batch.seq_index, batch.n_seqs)


def naive_pair_logps(model, pairs: list[Encoded]) -> torch.Tensor:
    return torch.stack([naive_answer_logps(model, p.prompt, a).sum() for p in pairs for a in p.answers])


def story_pairs(tok, data_dir, n: int, max_length: int) -> list[Encoded]:
    rows = [json.loads(line) for line in (data_dir / "dpo_train.jsonl").read_text().splitlines()[:n]]
    return [encode(tok, r["prompt"], [r["chosen"], r["rejected"]], max_length) for r in rows]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_pack_pairs_match_naive_forward(tok, tiny_llama, data_dir, share_prefix):
    """Three story pairs of unequal lengths (cut at 180 tokens) plus a short hand-written one, in one
    padded batch: the summed log-probs of every chosen/rejected answer equal those of a plain
    forward of prompt + answer alone."""
    pairs = story_pairs(tok, data_dir, 3, max_length=180)
    pairs.append(encode(tok, PROMPT, [ANSWER, "No."], max_length=180))
    batch = pack_pairs(pairs, share_prefix=share_prefix, pad_id=tok.pad_token_id)
    assert batch.n_seqs == 8
    assert batch.input_ids.shape[0] == (4 if share_prefix else 8)
    got = packed_seq_logps(tiny_llama, batch)
    torch.testing.assert_close(got, naive_pair_logps(tiny_llama, pairs), atol=1e-4, rtol=0)


def test_padded_batch_equals_unpadded(chat_tokenizer, tiny_llama, data_dir):
    tok = chat_tokenizer
    pairs = [encode(tok, PROMPT, [ANSWER, "No."], 200)] + story_pairs(tok, data_dir, 2, max_length=200)
    pairs[2] = encode(tok, "Hi", ["Hello there.", "Go away now, please."], 200)
    batch = pack_pairs(pairs, share_prefix=True, pad_id=tok.pad_token_id)
    lengths = [len(p.prompt) + sum(map(len, p.answers)) for p in pairs]
    assert len(set(lengths)) == 3 and batch.input_ids.shape[1] == max(lengths)
    alone = torch.cat([packed_seq_logps(tiny_llama, pack_pairs([p], True, tok.pad_token_id)) for p in pairs])
    torch.testing.assert_close(packed_seq_logps(tiny_llama, batch), alone, atol=1e-4, rtol=0)


def test_padding_tokens_are_never_targets(chat_tokenizer):
    tok = chat_tokenizer
    short = encode(tok, "Hi", ["Yes."], 64)
    long = encode(tok, PROMPT, [ANSWER], 64)
    batch = pack_examples([short, long], pad_id=tok.pad_token_id)
    n_short = len(short.prompt) + len(short.answers[0])
    assert (batch.input_ids[0, n_short:] == tok.pad_token_id).all()  # pad == eos fills the short row
    assert not batch.keep[0, n_short - 1:].any()
    assert batch.labels.tolist() == short.answers[0] + long.answers[0]
    assert batch.seq_index.tolist() == [0] * len(short.answers[0]) + [1] * len(long.answers[0])


def test_sft_rows_match_naive_forward(chat_tokenizer, tiny_llama):
    """pack_examples with a single-turn and a multi-turn example: per-token log-probs equal a plain
    forward of each whole sequence, read at the target positions."""
    tok = chat_tokenizer
    single = encode(tok, PROMPT, [ANSWER], 128)
    multi = encode_conversation(tok, CONVERSATION, 128)
    batch = pack_examples([single, multi], pad_id=tok.pad_token_id)
    with torch.no_grad():
        got = forward_logps(tiny_llama, batch)
    expected = [naive_answer_logps(tiny_llama, single.prompt, single.answers[0])]
    done: list[int] = []
    for ids, is_target in multi.segments:
        if is_target:
            expected.append(naive_answer_logps(tiny_llama, done, ids))
        done = done + ids
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=0)


def test_the_dense_mask_is_built_on_demand_from_the_compact_layout():
    """Row 1 [prompt 1 2, answer 3, answer 4 5]; row 2 two examples [7, 8] [7, 8] and a pad: the
    masks written out by hand. The batch holds only (B, L) tensors; the (B, 1, L, L) mask exists
    only when asked for."""
    row = RowBuilder()
    row.add([1, 2], [[3], [4, 5]], group=0)
    two = RowBuilder()
    two.add([7], [[8]], group=0)
    two.add([7], [[8]], group=1)  # a second example in the row: never sees the first
    batch = stack_rows([row, two], pad_id=0)
    assert all(v.dim() <= 2 for v in vars(batch).values() if isinstance(v, torch.Tensor))
    T, F = True, False
    first = torch.tensor([
        [T, F, F, F, F],  # 1
        [T, T, F, F, F],  # 2
        [T, T, T, F, F],  # 3: prompt + itself
        [T, T, F, T, F],  # 4: prompt, not the sibling answer 3
        [T, T, F, T, T],  # 5
    ])
    second = torch.tensor([
        [T, F, F, F, F],  # 7
        [T, T, F, F, F],  # 8
        [F, F, T, F, F],  # 7 of the second example
        [F, F, T, T, F],  # 8 of the second example
        [F, F, F, F, T],  # pad: only itself
    ])
    got = batch.dense_mask()
    assert got.shape == (2, 1, 5, 5)
    assert torch.equal(got[0, 0], first)
    assert torch.equal(got[1, 0], second)
