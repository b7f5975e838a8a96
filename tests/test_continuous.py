"""Continuous batching (`picoalign.generation.continuous`) on the tiny random Llama, fp32, one
step at a time (no thread): requests that join a running batch, or leave it, get the answers
they get alone; each keeps its own sampling; cancel, deadline, the queue limit, a failing
request, and the prompt's log-probs against the model's own."""

from __future__ import annotations

import time

import pytest
import torch

from picoalign.generation.batched import Sampling, generate_full
from picoalign.generation.continuous import Batcher, QueueFull, Wants

PROMPTS = ["Once upon a time", "The door creaked open and a small", "Hello there.",
           "What is the capital of France? Paris is the capital of France. And of"]


class Events:
    """An `emit` that keeps what it is told."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []

    def __call__(self, kind, value) -> None:
        self.items.append((kind, value))

    def text(self) -> str:
        return "".join(v for k, v in self.items if k == "text")


def ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def run_until_done(batcher: Batcher, jobs, limit: int = 500) -> None:
    for _ in range(limit):
        if all(j.done for j in jobs):
            return
        batcher.step()
    raise AssertionError("the jobs did not finish")


def alone(model, tokenizer, prompt: str, sampling: Sampling):
    batcher = Batcher(model, tokenizer, max_batch=1)
    job = batcher.submit(ids(tokenizer, prompt), sampling, Events())
    run_until_done(batcher, [job])
    return job


def test_requests_that_join_and_leave_a_running_batch_get_their_greedy_answer_alone(tiny_llama, chat_tokenizer):
    """Four prompts of different lengths and answer lengths: two start together, one joins after
    3 steps, one after 7; the short answers leave while the others go on. Each answer's tokens
    equal the same request run alone, and transformers' own `generate` on that prompt."""
    lengths = [20, 6, 14, 9]
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=4)
    jobs, sizes = [], []
    for step in range(200):
        if step in (0, 3, 7):
            for n in ([0, 1] if step == 0 else [2] if step == 3 else [3]):
                jobs.append(batcher.submit(ids(chat_tokenizer, PROMPTS[n]), Sampling(lengths[n]), Events()))
        batcher.step()
        sizes.append(len(batcher.running))
        if len(jobs) == 4 and all(j.done for j in jobs):
            break
    assert max(sizes) >= 3 and sizes[-1] == 0  # they ran together, and all left
    assert sizes.index(max(sizes)) > 0 and any(a > b > 0 for a, b in zip(sizes, sizes[1:]))  # some left early
    refs = generate_full(tiny_llama, chat_tokenizer, PROMPTS, Sampling(max(lengths)), batch_size=1, raw=True)
    for n, job in enumerate(jobs):
        solo = alone(tiny_llama, chat_tokenizer, PROMPTS[n], Sampling(lengths[n]))
        assert job.new_ids == solo.new_ids and job.result == solo.result
        expected = generate_full(tiny_llama, chat_tokenizer, [PROMPTS[n]], Sampling(lengths[n]), raw=True)[0]
        assert job.result.text == expected.text and job.result.completion_tokens == expected.completion_tokens
        assert job.result.finish_reason == expected.finish_reason
        assert refs[n].text.startswith(job.result.text)


def test_each_request_keeps_its_own_sampling(tiny_llama, chat_tokenizer):
    """In one batch: a greedy request, two sampled ones with the same seed and one with another.
    The same seed gives the same answer, in the batch or alone; the other seed differs; the
    greedy row is the greedy answer; top_k=1 is greedy too."""
    sampled = Sampling(16, greedy=False, temperature=1.0, top_p=0.95, seed=7)
    settings = [Sampling(16), sampled, sampled, Sampling(16, greedy=False, temperature=1.0, top_p=0.95, seed=8),
                Sampling(16, greedy=False, temperature=1.5, top_k=1, seed=3)]
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=8)
    prompt = ids(chat_tokenizer, PROMPTS[0])
    jobs = [batcher.submit(prompt, s, Events()) for s in settings]
    run_until_done(batcher, jobs)
    greedy, a, b, other, top1 = (j.new_ids for j in jobs)
    assert a == b == alone(tiny_llama, chat_tokenizer, PROMPTS[0], sampled).new_ids
    assert other != a and a != greedy
    assert greedy == top1 == alone(tiny_llama, chat_tokenizer, PROMPTS[0], Sampling(16)).new_ids


def test_stop_strings_and_streaming_pieces_per_request(tiny_llama, chat_tokenizer):
    """A stop string taken from the middle of the greedy answer cuts it there, for that request
    only; what was streamed is exactly the final text (no piece of the stop string shown)."""
    full = alone(tiny_llama, chat_tokenizer, PROMPTS[1], Sampling(24)).result.text
    stop = full.split()[3]
    assert stop in full[1:]
    expected = full[: full.find(stop)]
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=2)
    cut, plain = Events(), Events()
    jobs = [batcher.submit(ids(chat_tokenizer, PROMPTS[1]), Sampling(24, stop=(stop,)), cut),
            batcher.submit(ids(chat_tokenizer, PROMPTS[1]), Sampling(24), plain)]
    run_until_done(batcher, jobs)
    assert (jobs[0].result.text, jobs[0].result.finish_reason) == (expected, "stop")
    assert cut.text() == expected and cut.items[-1] == ("done", jobs[0].result)
    assert plain.text() == full == jobs[1].result.text
    assert len([k for k, _ in plain.items if k == "text"]) >= 3  # streamed, not sent at the end


def test_cancel_frees_the_row_at_the_next_step_and_the_others_go_on(tiny_llama, chat_tokenizer):
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=2)
    leaving, staying = Events(), Events()
    job = batcher.submit(ids(chat_tokenizer, PROMPTS[0]), Sampling(30), leaving)
    other = batcher.submit(ids(chat_tokenizer, PROMPTS[2]), Sampling(12), staying)
    for _ in range(3):
        batcher.step()
    assert len(batcher.running) == 2
    job.cancel()
    batcher.step()
    assert job.result.finish_reason == "cancelled" and batcher.running == [other]
    assert len(job.new_ids) == 3 and len(batcher.engine.rows) == 1
    run_until_done(batcher, [other])
    assert other.new_ids == alone(tiny_llama, chat_tokenizer, PROMPTS[2], Sampling(12)).new_ids


def test_a_request_past_its_deadline_ends_with_finish_reason_deadline(tiny_llama, chat_tokenizer):
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=2)
    events = Events()
    job = batcher.submit(ids(chat_tokenizer, PROMPTS[0]), Sampling(30), events,
                         Wants(deadline=time.monotonic() + 3600))
    batcher.step()
    batcher.step()
    job.wants.deadline = time.monotonic() - 1
    batcher.step()
    assert job.result.finish_reason == "deadline" and job.result.completion_tokens == 2
    assert events.items[-1] == ("done", job.result) and batcher.running == []
    late = batcher.submit(ids(chat_tokenizer, PROMPTS[0]), Sampling(30), Events(), Wants(deadline=0.0))
    batcher.step()  # still waiting when its time ran out: it never starts
    assert (late.result.finish_reason, late.new_ids) == ("deadline", [])


def test_the_queue_takes_max_batch_plus_queue_size_then_refuses(tiny_llama, chat_tokenizer):
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=2, queue_size=1)
    prompt = ids(chat_tokenizer, PROMPTS[2])
    jobs = [batcher.submit(prompt, Sampling(4), Events()) for _ in range(3)]
    with pytest.raises(QueueFull, match="2 requests are generating and 1 are already waiting"):
        batcher.submit(prompt, Sampling(4), Events())
    batcher.step()
    assert batcher.status() | {"tokens_per_s": 0} == {"running": 2, "waiting": 1, "max_batch": 2, "queue_size": 1,
                                                      "tokens_per_s": 0}
    run_until_done(batcher, jobs)
    assert [j.result.completion_tokens for j in jobs] == [4, 4, 4]
    assert batcher.status()["tokens_per_s"] > 0


def test_a_request_is_not_counted_once_its_answer_is_out(tiny_llama, chat_tokenizer):
    """The server answers a request as soon as it finishes, inside the step; the step drops its
    cache row only at its end. Status read at the moment of the answer (as a client would right
    after) must not count it, nor may it hold a place a new request could take."""
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=1, queue_size=0)
    seen = []

    def emit(kind, value):
        if kind == "done":
            seen.append(batcher.status()["running"])
            batcher.submit(ids(chat_tokenizer, PROMPTS[2]), Sampling(2), Events())  # its place is free

    job = batcher.submit(ids(chat_tokenizer, PROMPTS[2]), Sampling(3), emit)
    run_until_done(batcher, [job])
    assert seen == [0] and job.result.completion_tokens == 3
    assert batcher.status()["waiting"] == 1


def test_a_request_that_fails_fails_alone(tiny_llama, chat_tokenizer):
    """A prompt with a token id beyond the vocabulary fails its prefill; the request that
    joined at the same step, and the one already running, answer as they would alone."""
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=4)
    running = batcher.submit(ids(chat_tokenizer, PROMPTS[0]), Sampling(10), Events())
    batcher.step()
    broken = Events()
    bad = batcher.submit([5, tiny_llama.config.vocab_size + 10], Sampling(10), broken)
    good = batcher.submit(ids(chat_tokenizer, PROMPTS[2]), Sampling(10), Events())
    run_until_done(batcher, [running, bad, good])
    assert broken.items[0][0] == "error" and isinstance(broken.items[0][1], IndexError)
    assert bad.result.finish_reason == "error"
    assert running.new_ids == alone(tiny_llama, chat_tokenizer, PROMPTS[0], Sampling(10)).new_ids
    assert good.new_ids == alone(tiny_llama, chat_tokenizer, PROMPTS[2], Sampling(10)).new_ids


def test_prompt_and_answer_logprobs_are_the_models_own(tiny_llama, chat_tokenizer):
    """echo: log-prob of each prompt token after the ones before it, and the top 3 there, from a
    plain forward of the model; the answer's greedy tokens are each position's top-1."""
    prompt = ids(chat_tokenizer, PROMPTS[3])
    batcher = Batcher(tiny_llama, chat_tokenizer, max_batch=2)
    other = batcher.submit(ids(chat_tokenizer, PROMPTS[0]), Sampling(8), Events())
    batcher.step()  # a running row, so the echo request joins a batch
    job = batcher.submit(prompt, Sampling(5), Events(), Wants(logprobs=3, echo=True))
    run_until_done(batcher, [job, other])
    with torch.no_grad():
        full = torch.tensor([prompt + job.new_ids])
        logp = torch.log_softmax(tiny_llama(full).logits[0].float(), dim=-1)
    assert job.prompt_logprobs[0] is None and len(job.prompt_logprobs) == len(prompt)
    for i, row in enumerate(job.prompt_logprobs[1:], start=1):
        assert row.token_id == prompt[i]
        assert row.logprob == pytest.approx(float(logp[i - 1, prompt[i]]), abs=1e-5)
        top = logp[i - 1].topk(3)
        assert [t for t, _ in row.top] == top.indices.tolist()
        assert [v for _, v in row.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert [r.token_id for r in job.logprobs] == job.new_ids[: len(job.logprobs)]
    for n, row in enumerate(job.logprobs):
        at = len(prompt) - 1 + n
        assert row.logprob == pytest.approx(float(logp[at].max()), abs=1e-5) and row.top[0][0] == row.token_id
