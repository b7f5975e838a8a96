"""The decode engine (`picoalign.generation.engine`, `kv`, `sampling`): greedy tokens equal
transformers' `generate` token for token in fp32 (the tiny Llama, one prompt and a batch; the
built-in SmolLM2 in the slow test), sampled answers are reproducible and do not depend on the
batch, chunked prefill and prompt sharing give the same tokens, LoRA adapters stay live, a model
without the Llama layout falls back to its own forward, and bad input fails before decoding."""

from __future__ import annotations

import copy

import pytest
import torch

from picoalign.generation.batched import Sampling, end_ids, generate_full
from picoalign.generation.engine import Engine
from picoalign.generation.kv import LlamaKV, ModelKV, backend_for

PROMPTS = ["Once upon a time", "The door creaked open and a small", "Hello there.",
           "What is the capital of France? Paris is the capital of France. And of"]


def hf_greedy(model, tokenizer, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=end_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_equals_transformers_generate_alone_and_in_a_batch(tiny_llama, chat_tokenizer):
    assert isinstance(backend_for(tiny_llama, 1), LlamaKV)  # the fast path is the one under test
    batch = generate_full(tiny_llama, chat_tokenizer, PROMPTS, Sampling(16), batch_size=4, raw=True)
    for prompt, got in zip(PROMPTS, batch):
        ids = chat_tokenizer(prompt)["input_ids"]
        expected = hf_greedy(tiny_llama, chat_tokenizer, ids, 16)
        assert got.token_ids == expected[: len(got.token_ids)] and len(got.token_ids) == 16
        alone = generate_full(tiny_llama, chat_tokenizer, [prompt], Sampling(16), batch_size=1, raw=True)[0]
        assert alone.token_ids == got.token_ids


def test_chunked_prefill_and_shared_prompts_give_the_same_tokens(tiny_llama, chat_tokenizer):
    """A prompt run 5 tokens at a time while another row decodes, and rows that copy a prompt's
    cache instead of running it, write what a whole-prompt prefill writes."""
    s = Sampling(12)
    whole = generate_full(tiny_llama, chat_tokenizer, PROMPTS, s, raw=True)
    engine = Engine(tiny_llama, chat_tokenizer, max_rows=6, prefill_chunk=5)
    ids = [chat_tokenizer(p)["input_ids"] for p in PROMPTS]
    rows = [engine.add(ids[0], s), engine.add(ids[3], s)]
    first = rows[1]
    rows += [engine.add(ids[3], s, share=first), engine.add(ids[3], s, share=first)]
    steps = 0
    while engine.rows:
        engine.step()
        steps += 1
    assert steps > 12  # the long prompt took several steps
    assert [r.new_ids for r in rows] == [whole[0].token_ids] + [whole[3].token_ids] * 3
    assert rows[2].filled == len(ids[3]) and rows[2].last_prompt_logits is first.last_prompt_logits


def test_sampled_answers_are_reproducible_and_independent_of_the_batch(tiny_llama, chat_tokenizer):
    s = Sampling(12, greedy=False, temperature=1.3, top_p=0.9, top_k=40, seed=11)
    together = generate_full(tiny_llama, chat_tokenizer, PROMPTS, s, batch_size=8, raw=True, n=2)
    again = generate_full(tiny_llama, chat_tokenizer, PROMPTS, s, batch_size=8, raw=True, n=2)
    one_by_one = generate_full(tiny_llama, chat_tokenizer, PROMPTS, s, batch_size=1, raw=True, n=2)
    assert [g.token_ids for g in together] == [g.token_ids for g in again] == [g.token_ids for g in one_by_one]
    assert together[0].token_ids != together[1].token_ids  # the two answers of a prompt differ
    other_seed = generate_full(tiny_llama, chat_tokenizer, PROMPTS, Sampling(12, greedy=False, temperature=1.3,
                               top_p=0.9, top_k=40, seed=12), raw=True, n=2)
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in together]


def test_top_p_keeps_the_nucleus_only(tiny_llama, chat_tokenizer):
    """With top_p tiny only the most likely token is left: the answer is the greedy one."""
    sampled = generate_full(tiny_llama, chat_tokenizer, PROMPTS[:2],
                            Sampling(10, greedy=False, temperature=1.0, top_p=1e-6, seed=1), raw=True)
    assert [g.token_ids for g in sampled] == [g.token_ids for g in
                                              generate_full(tiny_llama, chat_tokenizer, PROMPTS[:2], Sampling(10),
                                                            raw=True)]


def test_repetition_penalty_matches_transformers(tiny_llama, chat_tokenizer):
    ids = chat_tokenizer(PROMPTS[1])["input_ids"]
    got = generate_full(tiny_llama, chat_tokenizer, [PROMPTS[1]], Sampling(12, repetition_penalty=1.8), raw=True)[0]
    t = torch.tensor([ids])
    ref = tiny_llama.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=12, do_sample=False,
                              repetition_penalty=1.8, eos_token_id=end_ids(tiny_llama, chat_tokenizer),
                              pad_token_id=chat_tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert got.token_ids == ref[: len(got.token_ids)]
    assert got.token_ids != generate_full(tiny_llama, chat_tokenizer, [PROMPTS[1]], Sampling(12), raw=True)[0].token_ids


def test_lora_adapters_stay_live(tiny_llama, chat_tokenizer):
    """A peft model generates with its adapter (not merged): changing the adapter's weights
    changes the answer, and it equals the merged model's answer."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()  # as in RL: sampling from the weights being trained, mode given back after
    got = generate_full(model, chat_tokenizer, PROMPTS, Sampling(10), raw=True)
    assert model.training and isinstance(backend_for(model, 1), LlamaKV)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    assert [g.token_ids for g in got] == [g.token_ids for g in generate_full(merged, chat_tokenizer, PROMPTS,
                                                                             Sampling(10), raw=True)]
    base = generate_full(tiny_llama, chat_tokenizer, PROMPTS, Sampling(10), raw=True)
    assert [g.token_ids for g in got] != [g.token_ids for g in base]


def test_a_model_without_the_llama_layout_generates_through_its_own_forward(chat_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(chat_tokenizer), n_embd=32, n_layer=2, n_head=4,
                                       n_positions=256, eos_token_id=chat_tokenizer.eos_token_id)).eval()
    assert isinstance(backend_for(model, 1), ModelKV)
    got = generate_full(model, chat_tokenizer, PROMPTS, Sampling(8), batch_size=3, raw=True, n=2)
    for prompt, g in zip(PROMPTS, got[::2]):
        assert g.token_ids == hf_greedy(model, chat_tokenizer, chat_tokenizer(prompt)["input_ids"], 8)[:len(g.token_ids)]
    assert [g.token_ids for g in got[::2]] == [g.token_ids for g in got[1::2]]


@pytest.mark.parametrize("sampling, message", [
    (Sampling(0), "max_new_tokens must be at least 1"),
    (Sampling(4000), "exceed the model's context of 2048"),
    (Sampling(4, greedy=False, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (Sampling(4, greedy=False, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (Sampling(4, stop=tuple(str(i) for i in range(17))), "at most 16 stop strings"),
])
def test_bad_input_fails_before_any_decoding(tiny_llama, chat_tokenizer, sampling, message, monkeypatch):
    monkeypatch.setattr(Engine, "step", lambda self: pytest.fail("decoding started"))
    with pytest.raises(ValueError, match=message):
        generate_full(tiny_llama, chat_tokenizer, PROMPTS, sampling, raw=True)


def test_a_prompt_longer_than_the_context_is_refused(tiny_llama, chat_tokenizer):
    with pytest.raises(ValueError, match=r"the prompt \(\d+ tokens\) does not fit the model's context of 2048"):
        generate_full(tiny_llama, chat_tokenizer, ["a " * 2100], Sampling(4), raw=True)


@pytest.mark.slow
def test_builtin_greedy_equals_transformers_generate():
    """SmolLM2-135M in fp32 on its packed weights (prepack.py): a batch of four chat prompts,
    24 tokens each, equals `generate`, which runs the plain `F.linear`."""
    from picoalign.generation.batched import encode_prompt
    from picoalign.generation.prepack import packable
    from picoalign.models.load import load_for_inference

    model, tokenizer = load_for_inference("builtin:smollm2-135m-instruct", device="cpu", dtype="fp32")
    prompts = ["Write a one-line story about a cat.", "What is the capital of France?",
               "Write a short horror story about a lighthouse keeper.", "List three colours."]
    got = generate_full(model, tokenizer, prompts, Sampling(24), batch_size=4)
    assert isinstance(backend_for(model, 1), LlamaKV)
    assert len(packable(model)) == 30 * 7 + 1 or not torch.backends.mkldnn.is_available()
    for prompt, g in zip(prompts, got):
        assert g.token_ids == hf_greedy(model, tokenizer, encode_prompt(tokenizer, prompt), 24)[: len(g.token_ids)]


def test_packed_linears_follow_the_weight_and_give_it_back():
    """Inside the context a linear runs on its packed copy (F.linear to float tolerance); a
    weight changed in place (an optimizer step) is packed again; outside, the module is as it was."""
    from picoalign.generation.prepack import packable, packed_linears

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Linear(8, 8))
    x = torch.randn(3, 512)
    linears = packable(model)
    assert linears == [model[0]]  # the tiny one is left alone
    with torch.inference_mode(), packed_linears(linears):
        assert "forward" in model[0].__dict__
        first = model[0](x)
    assert torch.allclose(first, torch.nn.functional.linear(x, model[0].weight, model[0].bias), atol=1e-4)
    with torch.no_grad():
        model[0].weight.mul_(2)  # in place: the version changes, the storage does not
    with torch.inference_mode(), packed_linears(packable(model)):
        second = model[0](x)
    assert torch.allclose(second, 2 * first - model[0].bias, atol=1e-4)
    assert "forward" not in model[0].__dict__ and model[0](x).requires_grad


def test_top_p_and_top_k_masks_equal_transformers_warpers():
    """The nucleus found among the top candidates (and, for a flat row, by sorting the whole
    vocabulary) is the token set transformers' TopPLogitsWarper keeps, row by row."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from picoalign.generation.sampling import NUCLEUS_CANDIDATES, _top_k, _top_p

    g = torch.Generator().manual_seed(0)
    vocab = 4 * NUCLEUS_CANDIDATES
    scores = torch.randn(6, vocab, generator=g) * torch.tensor([[8.0], [4.0], [2.0], [1.0], [0.05], [0.01]])
    assert scores[4:].softmax(-1).max() < 1 / NUCLEUS_CANDIDATES  # flat rows: the nucleus is past the candidates
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = _top_p(scores, torch.full((6,), p))
        theirs = TopPLogitsWarper(p)(None, scores.clone())
        assert torch.equal(ours.isinf(), theirs.isinf()), p
        kept = (~ours.isinf()).sum(-1)
        assert kept[0] < kept[3] < kept[5] and kept[5] > NUCLEUS_CANDIDATES * (p > 0.3)
    mixed = _top_p(scores, torch.tensor([0.5, 1.0, 0.9, 1.0, 0.9, 1.0]))
    assert not mixed[1].isinf().any() and not mixed[5].isinf().any()
    for k in (1, 7, 50):
        assert torch.equal(_top_k(scores, torch.full((6,), k)).isinf(), TopKLogitsWarper(k)(None, scores.clone()).isinf())
