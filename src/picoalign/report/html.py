"""A small, safe Markdown-to-HTML converter for our own reports, and the one-file page around it.

It handles what sections.py writes and nothing more: `#` headings, paragraphs, `- ` lists,
`> ` quotes, tables, fenced blocks, images on a line of their own, and inline `code`, **bold**
and [links](relative/path). Every piece of text goes through `html.escape`; a link with a
scheme (http:, javascript:, ...) is shown as plain text, and an image is embedded as a data URI
or replaced by its alt text, so the page loads nothing from anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html import escape

FENCE = re.compile(r"^(`{3,})[^`]*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
TABLE_SEP = re.compile(r"^\|?(\s*:?-{3,}:?\s*\|)+\s*:?(-{3,})?:?\s*$")
INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\[([^\]]+)\]\(([^)\s]+)\)")
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


def inline(text: str) -> str:
    """Inline Markdown (code, bold, relative links) to HTML; all other text escaped."""
    out, pos = [], 0
    for m in INLINE.finditer(text):
        out.append(escape(text[pos : m.start()]))
        code, bold, label, href = m.groups()
        if code is not None:
            out.append(f"<code>{escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{inline(bold)}</strong>")
        elif SCHEME.match(href) or href.startswith(("//", "\\")):
            out.append(inline(label))  # not a file of this run: keep the words, drop the link
        else:
            out.append(f'<a href="{escape(href, quote=True)}">{inline(label)}</a>')
        pos = m.end()
    out.append(escape(text[pos:]))
    return "".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def _table(lines: list[str]) -> str:
    head, *body = (_cells(line) for line in lines)
    rows = ["<tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"]
    for row in body:
        tds = (f'<td class="num">{inline(c)}</td>' if NUMERIC.match(c) else f"<td>{inline(c)}</td>" for c in row)
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _image(alt: str, src: str, image: ImageFn) -> str:
    data = image(src)
    if not data:
        return f'<p class="missing">[{escape(alt)}]</p>'
    return f'<figure><img src="{escape(data, quote=True)}" alt="{escape(alt, quote=True)}"></figure>'


def to_html(md: str, image: ImageFn, prefix: str) -> str:
    """Convert our Markdown to an HTML fragment; headings get ids `<prefix>-1`, `<prefix>-2`, ..."""
    lines, out, para, i, n = md.splitlines(), [], [], 0, 0

    def flush() -> None:
        if para:
            out.append("<p>" + inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        s = lines[i].strip()
        if m := FENCE.match(s):
            flush()
            bar, body, i = m.group(1), [], i + 1
            while i < len(lines) and not (lines[i].strip().startswith(bar) and set(lines[i].strip()) == {"`"}):
                body.append(lines[i])
                i += 1
            out.append(f"<pre><code>{escape(chr(10).join(body))}</code></pre>")
            i += 1
            continue
        if s.startswith("|") and i + 1 < len(lines) and TABLE_SEP.match(lines[i + 1].strip()):
            flush()
            rows, i = [s], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(lines[i].strip())
                i += 1
            out.append(_table(rows))
            continue
        if s.startswith("- ") or s.startswith(">"):
            flush()
            mark = "- " if s.startswith("- ") else ">"
            block = []
            while i < len(lines) and lines[i].strip().startswith(mark):
                block.append(lines[i].strip()[len(mark) :])
                i += 1
            if mark == "- ":
                out.append("<ul>\n" + "\n".join(f"<li>{inline(b)}</li>" for b in block) + "\n</ul>")
            else:
                n += 1
                out.append(f"<blockquote>{to_html(chr(10).join(b.strip() for b in block), image, f'{prefix}-q{n}')}</blockquote>")
            continue
        i += 1
        if not s:
            flush()
        elif m := HEADING.match(s):
            flush()
            n, level = n + 1, len(m.group(1))
            out.append(f'<h{level} id="{prefix}-{n}">{inline(m.group(2))}</h{level}>')
        elif m := IMAGE.match(s):
            flush()
            out.append(_image(m.group(1), m.group(2), image))
        else:
            para.append(s)
    flush()
    return "\n".join(out)


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
