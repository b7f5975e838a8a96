"""Using a model: `picoalign generate`, the `picoalign chat` REPL (through a real pipe), and
`picoalign export` (merged logits equal base + adapter; the folder loads without peft).

Greedy answers are compared with `generate_full` run directly on the tiny model.
"""

from __future__ import annotations

import copy
import io
import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import save_random_adapter

from picoalign.cli import main
from picoalign.config import ChatConfig, ConfigError, ExportConfig, GenerateConfig
from picoalign.generation.batched import END_OF_TURN, Sampling, end_ids, generate_full
from picoalign.io import read_json
from picoalign.models.load import pick_dtype
from picoalign.train.batching import render_prompt
from picoalign.use.chat import chat, fit_messages
from picoalign.use.export import export, probe_ids
from picoalign.use.generate import generate_answers, read_prompts

FAST = ["--device", "cpu", "--dtype", "fp32"]


def greedy(model, tokenizer, prompts, n: int, raw: bool = False):
    return generate_full(model, tokenizer, prompts, Sampling(n, greedy=True), raw=raw)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# ---------------------------------------------------------------- decoding


def test_end_ids_include_the_templates_end_of_turn(tiny_llama, chat_tokenizer):
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_ids(tiny_llama, chat_tokenizer) == [im_end]
    other = copy.deepcopy(chat_tokenizer)
    other.eos_token = "<|endoftext|>"  # a base model's EOS, with a ChatML template on top
    model = copy.deepcopy(tiny_llama)
    model.generation_config.eos_token_id = None
    assert "<|im_end|>" in END_OF_TURN
    assert end_ids(model, other) == sorted([other.convert_tokens_to_ids("<|endoftext|>"), im_end])


def test_top_k_1_sampling_is_greedy(tiny_llama, chat_tokenizer):
    prompts = ["Hello there.", "What is the capital of France?"]
    sampled = generate_full(tiny_llama, chat_tokenizer, prompts,
                            Sampling(10, greedy=False, temperature=1.5, top_p=1.0, top_k=1, seed=3))
    assert [g.text for g in sampled] == [g.text for g in greedy(tiny_llama, chat_tokenizer, prompts, 10)]
    wide = generate_full(tiny_llama, chat_tokenizer, prompts,
                         Sampling(10, greedy=False, temperature=1.5, top_p=1.0, top_k=0, seed=3))
    assert [g.text for g in wide] != [g.text for g in sampled]  # without top_k the samples differ


def test_stop_strings_cut_the_answer(tiny_llama, chat_tokenizer):
    (ref,) = greedy(tiny_llama, chat_tokenizer, ["Hello there."], 24)
    stop = re.search(r" [a-z]{2,}", ref.text[4:]).group()  # a word in the middle of the greedy answer
    (cut,) = generate_full(tiny_llama, chat_tokenizer, ["Hello there."], Sampling(24, greedy=True, stop=(stop,)))
    assert cut.text == ref.text[: ref.text.find(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < ref.completion_tokens and ref.finish_reason == "length"


def test_n_answers_per_prompt_come_prompt_by_prompt_with_their_token_ids(tiny_llama, chat_tokenizer):
    prompts = ["Hello there.", "What is the capital of France?"]
    groups = generate_full(tiny_llama, chat_tokenizer, prompts,
                           Sampling(12, greedy=False, temperature=1.5, top_p=1.0, seed=5), n=3)
    assert len(groups) == 6
    alone = generate_full(tiny_llama, chat_tokenizer, [prompts[1]], Sampling(12, greedy=True))[0]
    greedy_groups = generate_full(tiny_llama, chat_tokenizer, prompts, Sampling(12, greedy=True), n=2)
    assert [g.text for g in greedy_groups[2:]] == [alone.text] * 2  # prompt 1's two answers follow prompt 0's
    assert len({g.text for g in groups[:3]}) > 1  # sampled: the group's answers differ
    for g in groups + greedy_groups:
        assert len(g.token_ids) == g.completion_tokens
        body = g.token_ids[:-1] if g.finish_reason == "stop" else g.token_ids
        assert chat_tokenizer.decode(body, skip_special_tokens=True) == g.text
    with pytest.raises(ValueError, match="n must be"):
        generate_full(tiny_llama, chat_tokenizer, prompts, Sampling(4), n=0)


# ---------------------------------------------------------------- generate


def test_generate_one_prompt_prints_the_answer(chat_model, tiny_llama, chat_tokenizer, capsys):
    (ref,) = greedy(tiny_llama, chat_tokenizer, ["Hello there."], 8)
    assert main(["generate", "--model", str(chat_model), "--prompt", "Hello there.", "--greedy",
                 "--max-new-tokens", "8", *FAST]) == 0
    assert capsys.readouterr().out == ref.text.strip() + "\n"


def test_generate_a_prompt_file_in_batches(chat_model, tiny_llama, chat_tokenizer, tmp_path):
    system = "You write horror."
    prompts = ["Hello there.", [user("What is the capital of France?")], "Tell me a story."]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p} if i != 1 else {"messages": p}) + "\n"
                            for i, p in enumerate(prompts)))
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", str(chat_model), "--prompt-file", str(path), "--out", str(out),
                 "--greedy", "--max-new-tokens", "8", "--batch-size", "2", "--system", system, *FAST]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    with_system = [[{"role": "system", "content": system}, *([user(p)] if isinstance(p, str) else p)]
                   for p in prompts]
    refs = greedy(tiny_llama, chat_tokenizer, with_system, 8)
    assert [r["response"] for r in rows] == [g.text.strip() for g in refs]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["prompt_tokens"] for r in rows] == [len(render_prompt(chat_tokenizer, m)) for m in with_system]


def test_generate_raw_text_file(plain_model, plain_tokenizer, tiny_llama, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\n\nThe door creaked\n")
    assert main(["generate", "--model", str(plain_model), "--prompt-file", str(path), "--raw", "--greedy",
                 "--max-new-tokens", "6", *FAST]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    refs = greedy(tiny_llama, plain_tokenizer, ["Once upon a time", "The door creaked"], 6, raw=True)
    assert [r["response"] for r in rows] == [g.text.strip() for g in refs]
    assert rows[0]["prompt_tokens"] == len(plain_tokenizer("Once upon a time")["input_ids"])  # with BOS


def test_generate_bad_inputs_say_where(chat_model, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    assert main(["generate", "--model", str(chat_model), "--prompt-file", str(path), *FAST]) == 1
    assert f"{path}:2: field 'prompt'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(chat_model), *FAST])
    assert info.value.code == 2 and "exactly one of prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--top-p", "0"])
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_a_prompt_file_nested_too_deeply_says_where(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: not valid JSON: nested too deeply$"):
        read_prompts(path)


# ---------------------------------------------------------------- chat


def test_chat_repl_through_a_pipe(chat_model, tiny_llama, chat_tokenizer):
    """A real pipe: answers on stdout one per line, the conversation kept, /settings, /reset, /exit."""
    lines = ["Hello there.", "What is the capital of France?", "/settings temperature=0.5 top_k=3",
             "/reset", "Hello there.", "/exit", "never read"]
    done = subprocess.run(
        [sys.executable, "-m", "picoalign", "chat", "--model", str(chat_model), "--greedy",
         "--max-new-tokens", "8", *FAST],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (a1,) = greedy(tiny_llama, chat_tokenizer, [[user(lines[0])]], 8)
    (a2,) = greedy(tiny_llama, chat_tokenizer, [[user(lines[0]), {"role": "assistant", "content": a1.text.strip()},
                                                 user(lines[1])]], 8)
    settings = "max_new_tokens=8 greedy=true temperature=0.5 top_p=0.9 top_k=3 seed=1234 context_tokens=0"
    assert done.stdout == f"{a1.text}\n{a2.text}\n{settings}\n{a1.text}\n"
    assert "(conversation cleared)" in done.stderr


def test_chat_drops_the_oldest_turns_to_fit_the_budget(chat_model, tiny_llama, chat_tokenizer):
    cfg = ChatConfig(model=str(chat_model), device="cpu", dtype="fp32", greedy=True, max_new_tokens=8,
                     system="Be brief.", context_tokens=60)
    out, notes = io.StringIO(), io.StringIO()
    chat(cfg, stdin=io.StringIO("Hello there.\nWhat is the capital of France?\nTell me more.\n"),
         stdout=out, notes=notes)
    answers = out.getvalue().split("\n")[:3]
    system = {"role": "system", "content": "Be brief."}
    history = [system, user("Hello there."), {"role": "assistant", "content": answers[0].strip()},
               user("What is the capital of France?"), {"role": "assistant", "content": answers[1].strip()},
               user("Tell me more.")]
    kept, dropped = fit_messages(chat_tokenizer, history, 60 - 8)
    assert dropped >= 2 and kept[0] == system and kept[1]["role"] == "user"
    assert len(render_prompt(chat_tokenizer, kept)) <= 52
    (ref,) = greedy(tiny_llama, chat_tokenizer, [kept], 8)
    assert answers[2] == ref.text
    assert "oldest messages to fit 52 prompt tokens" in notes.getvalue()


def test_fit_messages(chat_tokenizer):
    system = {"role": "system", "content": "S."}
    turns = [user("one"), {"role": "assistant", "content": "two"}, user("three"),
             {"role": "assistant", "content": "four"}, user("five")]
    whole = len(render_prompt(chat_tokenizer, [system, *turns]))
    assert fit_messages(chat_tokenizer, [system, *turns], whole) == ([system, *turns], 0)
    last_two = len(render_prompt(chat_tokenizer, [system, *turns[2:]]))
    assert fit_messages(chat_tokenizer, [system, *turns], last_two) == ([system, *turns[2:]], 2)
    assert fit_messages(chat_tokenizer, [system, *turns], last_two - 1) == ([system, turns[4]], 4)
    with pytest.raises(ValueError, match="longer than the budget"):
        fit_messages(chat_tokenizer, [system, user("x" * 50)], 5)


def test_chat_needs_a_chat_template(plain_model, capsys):
    assert main(["chat", "--model", str(plain_model), *FAST]) == 1
    assert "has no chat template, so it cannot chat" in capsys.readouterr().err


def test_chat_settings_change_and_refuse(chat_model):
    out, notes = io.StringIO(), io.StringIO()
    cfg = ChatConfig(model=str(chat_model), device="cpu", dtype="fp32")
    chat(cfg, stdin=io.StringIO("/settings top_p=2\n/settings model=x\n/nope\n"), stdout=out, notes=notes)
    assert "top_p must be in (0, 1]" in notes.getvalue() and "only these can change" in notes.getvalue()
    assert "unknown command /nope" in notes.getvalue()
    assert out.getvalue().count("top_p=0.9") == 2  # unchanged after the refusals


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def adapter_dir(chat_model, tmp_path_factory):
    """A LoRA adapter with random (non-zero) B, so merging changes the logits."""
    return save_random_adapter(chat_model, tmp_path_factory.mktemp("adapter"), ["q_proj", "v_proj", "down_proj"])


def test_an_adapter_generates_the_same_merged_or_on_its_base(adapter_dir, chat_model):
    def answer(model: str, merge: bool) -> str:
        cfg = GenerateConfig(model=model, prompt="Hello there.", greedy=True, max_new_tokens=8, device="cpu",
                             dtype="fp32", merge_adapter=merge, out="")
        return generate_answers(cfg)[0]["response"]

    merged = answer(str(adapter_dir), True)
    assert merged == answer(str(adapter_dir), False)
    assert merged != answer(str(chat_model), True)  # the adapter changes the answer


@torch.no_grad()
def test_export_merges_and_the_folder_loads_without_peft(adapter_dir, chat_model, chat_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    record = export(ExportConfig(model=str(adapter_dir), out=str(out)))
    assert record["merged_adapter"] and record["max_abs_logit_diff"] < 1e-4
    assert read_json(out / "picoalign.json")["max_abs_logit_diff"] == record["max_abs_logit_diff"]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= names
    assert "adapter_config.json" not in names
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert read_json(out / "generation_config.json")["eos_token_id"] == im_end

    ids = probe_ids(chat_tokenizer)
    base = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32).eval()
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    expected = with_adapter(input_ids=ids).logits
    with with_adapter.disable_adapter():
        assert (with_adapter(input_ids=ids).logits - expected).abs().max() > 1e-2  # the adapter matters

    # A fresh interpreter where importing peft fails: plain transformers must load the folder.
    script = (
        "import sys, json, torch; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): print(json.dumps({'logits': m(input_ids=ids).logits[0].tolist(), "
        "'template': bool(t.chat_template)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["template"]
    assert (torch.tensor(loaded["logits"]) - expected[0]).abs().max() < 1e-4


def test_export_command_refuses_to_overwrite(adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--model", str(adapter_dir), "--out", str(out), "--dtype", "bf16"]) == 0
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    record = read_json(out / "picoalign.json")
    assert record["dtype"] == "bf16" and 0 < record["max_abs_logit_diff"] < 1.0  # bf16 rounding, recorded
    assert record["max_abs_logit_diff_merged"] < 1e-4
    assert main(["export", "--model", str(adapter_dir), "--out", str(out)]) == 1
    assert "exists and is not empty (--overwrite replaces it)" in capsys.readouterr().err


def test_pick_dtype_refuses_an_unknown_setting_instead_of_reading_it_as_auto():
    cpu = torch.device("cpu")
    assert (pick_dtype("fp32", cpu), pick_dtype("bf16", cpu), pick_dtype("fp16", cpu)) == (
        torch.float32, torch.bfloat16, torch.float16)
    for typo in ("float32", "bfloat16", "fp64", ""):
        with pytest.raises(ConfigError, match=f"dtype must be one of auto, bf16, fp16, fp32; got {typo!r}"):
            pick_dtype(typo, cpu)
