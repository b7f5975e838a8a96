"""The report's Markdown as HTML (markdown-it-py, CommonMark + tables), in one self-contained page.

markdown-it-py parses; we only adjust its tokens before rendering: headings get ids
(`<prefix>-1`, ...), a link with a scheme (http:, javascript:, ...) or to another host keeps
its words and loses the link, an image becomes a data URI from `image(src)` or, when that gives
nothing, its alt text, and table cells that hold a number are right-aligned. Raw HTML in the
Markdown is shown as text (`html: False`), so the page loads nothing from anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html import escape

from markdown_it import MarkdownIt
from markdown_it.token import Token

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
NUMERIC = re.compile(r"^[+−-]?[\d,.]+%?$|^[\d.]+ (h|min|s)( \d+ (min|s))?$|^(—|∞|−∞)$")

ImageFn = Callable[[str], str | None]

CSS = """
body { margin: 0; color: #1d1d1f; background: #fff;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", "Noto Sans", Roboto, "Helvetica Neue", Arial, var(--cjk), sans-serif;
  /* any CJK font a machine has: macOS, Windows, then the common Linux packages (Noto/Source Han, WenQuanYi) */
  --cjk: "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", "Noto Sans CJK SC", "Noto Sans SC",
    "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Droid Sans Fallback"; }
:lang(zh) { font-family: system-ui, -apple-system, var(--cjk), "Noto Sans", sans-serif; }
nav.lang { position: sticky; top: 0; z-index: 1; background: #f5f5f7; border-bottom: 1px solid #ddd;
  padding: .45rem 1.25rem; font-size: .95rem; }
main { max-width: 1000px; margin: 0 auto; padding: .5rem 1.25rem 3rem; }
section + section { border-top: 3px double #ccc; margin-top: 2.5rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #e3e3e3; padding-bottom: .2rem; margin-top: 2rem; }
h3 { font-size: 1.05rem; margin-top: 1.5rem; }
table { border-collapse: collapse; margin: .75rem 0; font-size: .92rem; }
th, td { border: 1px solid #d0d0d0; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; border-radius: 6px; padding: .6rem .8rem;
  white-space: pre-wrap; overflow-wrap: anywhere; font-size: .86rem; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Noto Sans Mono CJK SC", monospace; }
:not(pre) > code { background: #f0f0f0; padding: 0 .25em; border-radius: 3px; }
img { max-width: 100%; height: auto; } figure { margin: 1rem 0; }
blockquote { border-left: 4px solid #e0a800; background: #fff8e1; margin: 1rem 0; padding: .3rem 1rem; }
.missing { color: #888; font-style: italic; }
main:has(#zh:target) #en, main:has(#en:target) #zh { display: none; }
"""


def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    # Every link and image reaches `_adjust`, which decides; markdown-it's own check would leave
    # a javascript: link in the page as its literal Markdown instead.
    md.validateLink = lambda url: True
    md.add_render_rule("image", _render_image)
    return md


def _render_image(self, tokens: list[Token], idx: int, options, env) -> str:
    token = tokens[idx]
    data, alt = env["image"](token.attrGet("src") or ""), self.renderInlineAsText(token.children or [], options, env)
    if not data:
        return f"[{escape(alt)}]"
    return f'<img src="{escape(data, quote=True)}" alt="{escape(alt, quote=True)}">'


def _unlink_external(children: list[Token]) -> list[Token]:
    """The inline tokens without the links that leave the run folder (their words stay)."""
    out, dropped = [], []
    for t in children:
        if t.type == "link_open":
            href = str(t.attrGet("href") or "")
            dropped.append(bool(SCHEME.match(href) or href.startswith(("//", "\\"))))
            if dropped[-1]:
                continue
        elif t.type == "link_close" and dropped.pop():
            continue
        if t.children:
            t.children = _unlink_external(t.children)
        out.append(t)
    return out


def _adjust(tokens: list[Token], image: ImageFn, prefix: str) -> None:
    n = 0
    for i, t in enumerate(tokens):
        if t.type == "heading_open":
            n += 1
            t.attrSet("id", f"{prefix}-{n}")
        elif t.type == "inline" and t.children:
            t.children = _unlink_external(t.children)
        elif t.type == "td_open" and NUMERIC.match(tokens[i + 1].content.strip()):
            t.attrSet("class", "num")
        elif t.type == "paragraph_open":
            kids = tokens[i + 1].children or []
            if len(kids) == 1 and kids[0].type == "image":  # an image on a line of its own
                shown = bool(image(kids[0].attrGet("src") or ""))
                t.tag = tokens[i + 2].tag = "figure" if shown else "p"
                if not shown:
                    t.attrSet("class", "missing")


def to_html(md: str, image: ImageFn, prefix: str) -> str:
    """The Markdown as an HTML fragment; headings get ids `<prefix>-1`, `<prefix>-2`, ..."""
    parser = _parser()
    env = {"image": image}
    tokens = parser.parse(md, env)
    _adjust(tokens, image, prefix)
    return parser.renderer.render(tokens, parser.options, env)


def page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """One self-contained HTML page: `sections` are (lang, label, HTML fragment), linked from the top."""
    nav = " · ".join(f'<a href="#{escape(lang)}" lang="{escape(lang)}">{escape(label)}</a>' for lang, label, _ in sections)
    nav += ' · <a href="#top">' + " + ".join(escape(label) for _, label, _ in sections) + "</a>"
    body = "\n".join(f'<section id="{escape(lang)}" lang="{escape(lang)}">\n{html}\n</section>' for lang, _, html in sections)
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f'<body id="top">\n<nav class="lang">{nav}</nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n'
    )
