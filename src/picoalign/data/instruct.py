"""TinyStoriesInstruct -> instruction-following SFT rows: summary, moral, use-the-words, questions.

    picoalign data --source tinystories-instruct --input TinyStoriesInstruct-valid.txt --out data/ts

The input is the plain-text release: records separated by `<|endoftext|>`, each made of lines
such as `Features: Dialogue, MoralValue`, `Words: quit, oak, gloomy`, `Summary: ...`,
`Random sentence: ...` and `Story:`, whose story runs on over the following lines. The real data
has no moral sentence, so the moral task is made only for records with a `Moral:` line.

The records (not the rows) are split, so no story is in two splits; n_sft_train/val/test give
the split ratio and, for a file with more records than their sum, the number of records used.
This source has no preference pairs: the dpo files are written empty.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from picoalign.config import DataConfig
from picoalign.data.formats import DataError

GENERATOR_VERSION = "tinystories-instruct-1"
END_OF_TEXT = "<|endoftext|>"
SPLITS = ("train", "val", "test")
FIELDS = {"Features": "features", "Words": "words", "Summary": "summary",
          "Random sentence": "random_sentence", "Moral": "moral", "Story": "story"}
FIELD_LINE = re.compile(r"^(Features|Words|Summary|Random sentence|Moral|Story):[ \t]?(.*)$")

SUMMARY_PROMPT = "Please provide a brief summary of the following story:\n\n{story}"
MORAL_PROMPT = "What is the moral of the following story?\n\n{story}"
WORDS_PROMPT = "Write a short story that uses all of these words: {words}"
QUESTION_PROMPT = "Read the story and answer the question.\n\nStory:\n{story}\n\nQuestion: {question}"

# Capitalised words that open sentences (or address people) but are not a character's name.
NOT_NAMES = frozenset("""
    A An The Once Upon One Two Three Every Each Some Any All Both Many Much More Most Other
    Then When While After Before Until Since Because But And So Or Yet If As At In On Of To For
    From With Without By Up Down Out Over Under Into Through About Again Also Just Only Even
    This That These Those There Here Now Soon Later Finally Suddenly Today Tonight Tomorrow
    Yesterday Next Last First Long Far Near Yes No Not Oh Ah Wow Hello Hi Hey Bye Goodbye
    Please Thank Thanks Sorry Okay Ok Let Look Come Go Wait Stop What Who Why Where How Which
    Do Does Did Don Can Could Will Would Should May Might Must Is Are Was Were Be Am Have Has Had
    He She It We They You Me Him Her Us Them My His Its Our Their Your Mine Yours I Mom Dad
    Mommy Daddy Mum Mama Papa Grandma Grandpa Granny Moral End Story
""".split())


def parse_tinystories_instruct(text: str) -> list[dict]:
    """The records of a TinyStoriesInstruct text that have a story, in file order, with ids."""
    records = []
    for chunk in text.split(END_OF_TEXT):
        record = _parse_record(chunk)
        if record is not None:
            records.append({"id": f"ts-{len(records):06d}", **record})
    return records


def _parse_record(chunk: str) -> dict | None:
    """One record: a `Name:` line starts a field, and the lines after it continue that field."""
    fields: dict[str, list[str]] = {}
    current = None
    for line in chunk.splitlines():
        match = FIELD_LINE.match(line)
        if match:
            current = FIELDS[match.group(1)]
            fields[current] = [match.group(2)]
        elif current is not None:
            fields[current].append(line)
    story = "\n".join(fields.get("story", [])).strip()
    if not story:
        return None
    return {
        "features": _items(fields.get("features")),
        "words": _items(fields.get("words")),
        "summary": _sentence(fields.get("summary")),
        "random_sentence": _sentence(fields.get("random_sentence")),
        "moral": _sentence(fields.get("moral")),
        "story": story,
    }


def _sentence(lines: list[str] | None) -> str | None:
    text = " ".join(line.strip() for line in lines or [] if line.strip())
    return text or None


def _items(lines: list[str] | None) -> list[str]:
    return [item.strip() for item in (_sentence(lines) or "").split(",") if item.strip()]


def main_character(story: str) -> str | None:
    """The first capitalised word that is a name. Stopwords that open sentences are skipped, and
    a word must recur or be seen mid-sentence: names do ('said Lily'), stray openers do not."""
    candidates: list[str] = []
    mid_sentence: set[str] = set()
    for sentence in re.split(r"(?<=[.!?])[\"']?\s+|\n+", story):
        for i, word in enumerate(re.findall(r"[A-Za-z]+", sentence)):
            if word[0].isupper() and len(word) > 1 and word not in NOT_NAMES:
                candidates.append(word)
                if i > 0:
                    mid_sentence.add(word)
    counts = Counter(candidates)
    names = (w for w in candidates if w in mid_sentence or counts[w] > 1)
    return next(names, candidates[0] if candidates else None)


def _first_sentence(story: str) -> str:
    return re.split(r"(?<=[.!?])\s+", story.strip(), maxsplit=1)[0]


def _questions(record: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs answerable from the record alone."""
    out = []
    name = main_character(record["story"])
    if name:
        out.append(("Who is the main character of this story?", f"The main character is {name}."))
    out.append(("What happens at the beginning of this story?", _first_sentence(record["story"])))
    if "BadEnding" in record.get("features", []):
        out.append(("Does this story have a happy ending?", "No, the story does not have a happy ending."))
    else:
        out.append(("Does this story have a happy ending?", "Yes, the story has a happy ending."))
    return out


def instruct_tasks(record: dict, rng: random.Random) -> list[dict]:
    """The SFT rows of one record: summary, moral (if given), use-the-words, and one question."""
    story = record["story"]
    tasks = []
    if record.get("summary"):
        tasks.append(("summary", SUMMARY_PROMPT.format(story=story), record["summary"]))
    if record.get("moral"):
        tasks.append(("moral", MORAL_PROMPT.format(story=story), record["moral"]))
    if record.get("words"):
        tasks.append(("words", WORDS_PROMPT.format(words=", ".join(record["words"])), story))
    question, answer = rng.choice(_questions(record))
    tasks.append(("question", QUESTION_PROMPT.format(story=story, question=question), answer))
    base = record.get("id", "ts")
    return [{"id": f"{base}-{task}", "prompt": prompt, "input": prompt, "response": response, "task": task}
            for task, prompt, response in tasks]


def split_sizes(n: int, wanted: tuple[int, int, int]) -> tuple[int, int, int]:
    """How many of `n` records go to train/val/test: `wanted` itself when there are enough,
    else the same ratio, with val and test getting one each when train can keep one."""
    total = sum(wanted)
    if total == 0:
        return 0, 0, 0
    if n >= total:
        return wanted
    val, test = (max(round(n * w / total), 1 if w else 0) for w in wanted[1:])
    keep_train = 1 if wanted[0] else 0
    while val + test > n - keep_train and val + test > 0:
        if test >= val:
            test -= 1
        else:
            val -= 1
    return n - val - test, val, test


def instruct_rows(cfg: DataConfig) -> dict[str, list[dict]]:
    """The six splits keyed like `sft_train`; the dpo splits are empty (no pairs in this source)."""
    path = Path(cfg.input or "")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: TinyStoriesInstruct input file not found")
    records = parse_tinystories_instruct(path.read_text(encoding="utf-8"))
    if not records:
        raise DataError(f"{path}: no TinyStoriesInstruct records (expected 'Story:' sections "
                        f"separated by {END_OF_TEXT})")
    rng = random.Random(cfg.seed)
    rng.shuffle(records)
    sizes = split_sizes(len(records), (cfg.n_sft_train, cfg.n_sft_val, cfg.n_sft_test))
    files: dict[str, list[dict]] = {}
    start = 0
    for split, size in zip(SPLITS, sizes):
        files[f"sft_{split}"] = [row for rec in records[start:start + size] for row in instruct_tasks(rec, rng)]
        start += size
    files.update({f"dpo_{split}": [] for split in SPLITS})
    return files
