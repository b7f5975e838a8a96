"""`picoalign chat`: talk with a model; each answer streams as it is generated.

    picoalign chat --model runs/demo/checkpoints/dpo
    picoalign chat --model runs/demo/checkpoints/sft --greedy --context-tokens 1024
    printf 'Hello\\n/settings temperature=0.2\\nTell me a story\\n' | picoalign chat --model ...

Commands: /reset (forget the conversation), /settings (show them; `/settings temperature=0.2
top_k=40` changes them), /exit. The conversation is kept, and when it and the next answer would
not fit in --context-tokens, the oldest turns are dropped (the system message stays). On a
terminal there is a `you>` prompt with line editing; under a pipe, stdout holds just the answers,
one after another, each ended by a newline, and notes go to stderr.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from picoalign import config as C
from picoalign.config import ChatConfig
from picoalign.generation.stream import Stream
from picoalign.models.chat import render_prompt
from picoalign.models.load import load_for_inference
from picoalign.use.generate import sampling_of

DECODING = ("max_new_tokens", "greedy", "temperature", "top_p", "top_k", "seed", "context_tokens")
HELP = "/reset forgets the conversation, /settings [key=value ...] shows or changes settings, /exit quits"


def fit_messages(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], int]:
    """The most recent messages whose prompt fits in `budget` tokens, and how many were dropped.

    Whole exchanges go, oldest first, and a leading system message is always kept; what is
    left always starts with a user turn. Raises ValueError if the last user turn alone is too long.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(render_prompt(tokenizer, system + turns)) > budget:
        if len(turns) <= 1:
            raise ValueError(f"the message alone is longer than the budget of {budget} tokens")
        cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
        turns, dropped = turns[cut:], dropped + cut
    return system + turns, dropped


class ChatSession:
    """A conversation with one model: `reply` streams the answer and keeps both turns."""

    def __init__(self, model, tokenizer, cfg: ChatConfig) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        self.turn = 0

    def budget(self) -> int:
        """Tokens the prompt may take: the context budget less room for the answer."""
        total = min(self.cfg.context_tokens or self.context, self.context)
        return max(total - self.cfg.max_new_tokens, 1)

    def reply(self, text: str, notes=sys.stderr):
        """Yield the answer to `text` piece by piece; afterwards it is part of the conversation."""
        messages, dropped = fit_messages(self.tokenizer, self.messages + [{"role": "user", "content": text}],
                                         self.budget())
        if dropped:
            print(f"(dropped the {dropped} oldest messages to fit {self.budget()} prompt tokens)", file=notes)
        sampling = replace(sampling_of(self.cfg), seed=self.cfg.seed + self.turn)
        stream = Stream(self.model, self.tokenizer, render_prompt(self.tokenizer, messages), sampling)
        yield from stream
        self.messages = messages + [{"role": "assistant", "content": stream.result.text.strip()}]
        self.turn += 1

    def settings(self) -> str:
        return " ".join(f"{k}={str(getattr(self.cfg, k)).lower()}" for k in DECODING)

    def change(self, pairs: list[str]) -> None:
        """Apply `key=value` pairs (decoding settings only); raises ConfigError on a bad one."""
        self.cfg = C.changed(self.cfg, pairs, DECODING)


def _read_line(stdin, stdout, interactive: bool) -> str | None:
    if interactive and stdin is sys.stdin:
        try:
            return input("you> ")  # line editing and history where readline exists
        except EOFError:
            return None
    if interactive:
        stdout.write("you> ")
        stdout.flush()
    line = stdin.readline()
    return line.rstrip("\r\n") if line else None


def command(session: ChatSession, line: str, stdout, notes) -> bool:
    """Run a /command; False means quit."""
    name, *args = line.split()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)", file=notes)
    elif name == "/settings":
        try:
            session.change(args)
        except C.ConfigError as e:
            print(f"error: {e}", file=notes)
        print(session.settings(), file=stdout, flush=True)
    else:
        print(f"unknown command {name}: {HELP}", file=notes)
    return True


def chat(cfg: ChatConfig, stdin=None, stdout=None, notes=None) -> None:
    """The REPL: read a line, stream the answer, until /exit or end of input."""
    stdin, stdout, notes = stdin or sys.stdin, stdout or sys.stdout, notes or sys.stderr
    interactive = stdin.isatty()
    model, tokenizer = load_for_inference(cfg.model, cfg.device, cfg.dtype, cfg.merge_adapter)
    if not tokenizer.chat_template:
        raise ValueError(f"{cfg.model} has no chat template, so it cannot chat; "
                         "`picoalign generate --raw --prompt TEXT` continues plain text")
    session = ChatSession(model, tokenizer, cfg)
    if interactive:
        print(f"Chatting with {cfg.model}. {HELP}.", file=stdout)
    while (line := _read_line(stdin, stdout, interactive)) is not None:
        if not line.strip():
            continue
        if line.startswith("/"):
            if not command(session, line, stdout, notes):
                break
            continue
        try:
            for piece in session.reply(line, notes):
                stdout.write(piece)
                stdout.flush()
        except ValueError as e:
            print(f"error: {e}", file=notes)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=notes)
        stdout.write("\n")
        stdout.flush()
