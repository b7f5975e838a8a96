"""An Ollama Modelfile for an exported GGUF: FROM the file, TEMPLATE (a Go template written from
the model's chat template), one `PARAMETER stop` per end-of-turn string.

Ollama does not read the Jinja chat template inside a GGUF; it needs its own Go template. Only
ChatML-style templates (`<|im_start|>role\\n...<|im_end|>\\n` per turn, SmolLM2's and Qwen's) are
translated: the tokenizer's template is rendered on probe conversations and must equal ChatML
exactly, including a default system message it adds when the conversation has none (that
becomes a branch of the Go template, so `ollama run` sees the same prompt as transformers).
Anything else is refused with the rendering it got, rather than guessed.
"""

from __future__ import annotations

import re

START, END = "<|im_start|>", "<|im_end|>"
PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a story."}]


def chatml(messages: list[dict], generation_prompt: bool = True) -> str:
    text = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages)
    return text + (f"{START}assistant\n" if generation_prompt else "")


def chatml_default_system(tokenizer) -> str | None:
    """The system message the template adds when there is none (None if it adds none); raises
    ValueError when the template is not ChatML."""
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if not tokenizer.chat_template:
        raise ValueError("--ollama: the model has no chat template to write a Modelfile TEMPLATE from")
    full = render(PROBE)
    if full != chatml(PROBE):
        raise ValueError(f"--ollama: the chat template is not ChatML-style (it renders {full!r}); only ChatML "
                         "templates are translated to Ollama's Go template")
    without = render(PROBE[1:])
    if without == chatml(PROBE[1:]):
        return None
    head = f"{START}system\n"
    default = without[len(head):].split(f"{END}\n", 1)[0] if without.startswith(head) else None
    if default is None or without != chatml([{"role": "system", "content": default}, *PROBE[1:]]):
        raise ValueError(f"--ollama: without a system message the chat template renders {without!r}, which is "
                         "not ChatML")
    return default


def go_template(default_system: str | None) -> str:
    """Ollama's TEMPLATE: every message as a ChatML turn, then the assistant's generation prompt."""
    system = (f'{{{{ if and (eq $i 0) (ne $m.Role "system") }}}}{START}system\n{default_system}{END}\n{{{{ end }}}}'
              if default_system is not None else "")
    return (f"{{{{- range $i, $m := .Messages }}}}{system}{START}{{{{ $m.Role }}}}\n"
            f"{{{{ $m.Content }}}}{END}\n{{{{ end }}}}{START}assistant\n")


def modelfile(gguf_name: str, tokenizer, stop_strings: list[str]) -> str:
    """The Modelfile text, FROM a file in the same folder."""
    template = go_template(chatml_default_system(tokenizer))
    if '"""' in template:
        raise ValueError('--ollama: the default system message contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stop_strings)]
    return "\n".join(lines) + "\n"


def ollama_name(folder_name: str) -> str:
    """A model name `ollama create` accepts, from the export folder's name."""
    return re.sub(r"[^a-z0-9._-]+", "-", folder_name.lower()).strip("-._") or "picoalign-model"
