"""Multi-turn data end to end through the batches: SFT trains every assistant turn and masks the
rest; a preference pair whose prompt is a conversation trains its final answers only, the prefix
rendered with the chat template (ultrafeedback_binarized / hh-rlhf shapes, read by data/formats.py)."""

from __future__ import annotations

import json

from picoalign.data.formats import read_preferences, read_sft
from picoalign.train.batching import encode, encode_conversation, pack_examples, pack_pairs

THREE_TURNS = [
    {"role": "system", "content": "Be eerie."},
    {"role": "user", "content": "A story?"},
    {"role": "assistant", "content": "The bell rang."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Nobody was there."},
    {"role": "user", "content": "Who rang it?"},
    {"role": "assistant", "content": "The keeper."},
]


def masked_view(tok, batch) -> str:
    """The row as text with each trained token in [brackets]: what the loss sees."""
    ids = batch.input_ids[0].tolist()
    predicted = {int(p) + 1 for p in batch.keep[0].nonzero().squeeze(1)}  # logits at p predict p + 1
    return "".join(f"[{tok.decode([t])}]" if i in predicted else tok.decode([t]) for i, t in enumerate(ids))


def test_sft_three_turns_train_every_answer_and_mask_the_rest(chat_tokenizer, tmp_path):
    tok = chat_tokenizer
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": THREE_TURNS}) + "\n", encoding="utf-8")
    (row,) = read_sft(path)
    batch = pack_examples([encode_conversation(tok, row["messages"], 256)], tok.pad_token_id)
    view = masked_view(tok, batch)
    trained = "".join(part.split("]")[0] for part in view.split("[")[1:])
    # exactly the three answers and their end-of-turn tokens (the template's "\n" after it too)
    assert trained == "The bell rang.<|im_end|>\nNobody was there.<|im_end|>\nThe keeper.<|im_end|>\n"
    # the system and user turns and each "<|im_start|>assistant\n" header are context
    context = "".join(part.split("]")[-1] for part in view.split("["))
    assert context == ("<|im_start|>system\nBe eerie.<|im_end|>\n<|im_start|>user\nA story?<|im_end|>\n"
                       "<|im_start|>assistant\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"
                       "<|im_start|>user\nWho rang it?<|im_end|>\n<|im_start|>assistant\n")
    assert batch.n_seqs == 1  # one sequence: its loss is the mean over all three answers' tokens


def test_preference_pair_on_a_conversation_trains_the_final_turn_only(chat_tokenizer, tmp_path):
    tok = chat_tokenizer
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps({"chosen": THREE_TURNS, "rejected": THREE_TURNS[:-1] + [
        {"role": "assistant", "content": "Nobody."}]}) + "\n", encoding="utf-8")
    (pair,) = read_preferences(path)
    assert pair["prompt"] == THREE_TURNS[:-1] and (pair["chosen"], pair["rejected"]) == ("The keeper.", "Nobody.")
    ex = encode(tok, pair["prompt"], [pair["chosen"], pair["rejected"]], 256)
    prefix = tok.apply_chat_template(THREE_TURNS[:-1], add_generation_prompt=True, tokenize=False)
    assert tok.decode(ex.prompt) == prefix  # the whole conversation so far, through the template
    batch = pack_pairs([ex], share_prefix=True, pad_id=tok.pad_token_id)
    chosen = batch.labels[batch.seq_index == 0].tolist()
    rejected = batch.labels[batch.seq_index == 1].tolist()
    # the earlier answers ("The bell rang.", "Nobody was there.") are context, never targets
    assert tok.decode(chosen) == "The keeper.<|im_end|>\n" and tok.decode(rejected) == "Nobody.<|im_end|>\n"
