"""Held-out hard preference pairs for the story task: both answers are dark horror stories.

    from picoalign.data.stories_heldout import heldout_pairs
    rows = heldout_pairs(64, seed=0, avoid_prompts=prompts_of_the_other_splits)

The prompts are drawn like those of data/stories.py (`random_spec`, `format_prompt`), so they
look the same to a model, but the answers come from sentence templates and words of their own,
and `rejected` is not wholesome. Two kinds of pair, half each:

- `darker`: the same opening, then a bleak turn and an ending where the threat wins (`chosen`)
  or a milder turn and an ending where the protagonist gets away or is left uneasy (`rejected`).
  The two are written sentence for sentence, so they match in length and shape.
- `off_spec`: one dark story filled in with the spec (`chosen`), or with a plain setting,
  protagonist, supporting character and object from this module's own lists in place of the
  spec's (`rejected`; the title, taboo and twist stay), so only following the spec separates them.

On the template pairs of data/stories.py the base model (SmolLM2-135M-Instruct) already gives
`chosen` the higher summed log-prob on most pairs (78% of 64, seed 0). Here the mild turns and
endings and the plain off-spec parts were picked, by scoring candidate wordings with that model,
so that likelihood alone does not separate the pairs: it prefers `chosen` on 50% of 64 (seed 0;
darker 56%, off_spec 44%). A model has to have learned the preference to do better.
"""

from __future__ import annotations

import dataclasses
import random

from picoalign.data.stories import StorySpec, format_prompt, random_spec, render

GENERATOR_VERSION = "heldout-1"
KINDS = ("darker", "off_spec")

# `{p}` first name, `{role}` "a locksmith", the spec fields by name; `{Supporting}` and `{Object}`
# start a sentence.
OPENINGS = [
    "As {role}, {p} had slept in stranger places than {setting}, or so {p} believed on the first "
    "evening. {Supporting} carried the bags upstairs without a word, then paused on the landing to "
    "give one instruction, slowly, and twice: {taboo}. On the bedside table lay {object}. Nobody had "
    "mentioned it, and nobody would say whose it was.",
    "Nobody met {p} at the gate of {setting}. A card pinned up in the porch listed the chores in "
    "square capitals, and underlined at the bottom was a single warning: {taboo}. {p}, {role} by "
    "trade and a sceptic by nature, read it aloud, folded it away, and went looking for {supporting}, "
    "who sat by the stove turning {object} over and over in both hands.",
    "The taxi driver would not go the last mile to {setting}, so {p} walked it, the suitcase bumping "
    "over the stones. {Supporting} opened up before {p} could ring, as though they had been watching "
    "the road all afternoon. Over weak tea came the one condition of staying: {taboo}. Then {object} "
    "was set down on the table between them, like a deposit.",
    "{p} took the work at {setting} because the pay was good and the interview was short. On the "
    "first evening {supporting} handed over {object} and a typed page of duties. Most were dull: bins, "
    "boilers, post. The last line was not: {taboo}. {p}, {role} for eleven years, asked why, and got "
    "only a shrug and a long, measuring look.",
]
# The middle paragraph, bleak or mild: the same eerie signs, but only in the bleak one is the
# warning broken. The two differ in a few clauses, line for line.
BLEAK_TURNS = [
    "For a fortnight {p} kept to it. Then one night, tired and irritated at being managed, {p} did "
    "exactly what the warning forbade. By morning small things were wrong: a chair turned to face "
    "the wall, fingerprints on the inside of the glass, {object} damp and smelling of earth. "
    "{Supporting} stopped eating and began to watch the stairs.",
    "The first time was an accident. {p} simply forgot, and by the time the mistake was plain it "
    "was too late. Doors that had been locked stood open at dawn, and something had been through "
    "the kitchen drawers. {Object} had moved to the foot of {p}'s bed, and {supporting} no longer "
    "used {p}'s name.",
    "{p} broke the warning on purpose, to prove it was superstition. For two days nothing changed. "
    "On the third day the birds left, the tap water ran grey, and {object} kept turning up in rooms "
    "{p} had not entered. {Supporting} packed a bag and went without a goodbye.",
]
MILD_TURNS = [
    "For a fortnight {p} kept to it. Then one night, tired and irritated at being managed, {p} came "
    "close to doing what the warning forbade. By morning small things were wrong: a chair turned to "
    "face the wall, fingerprints on the inside of the glass, {object} damp and smelling of earth. "
    "{Supporting} stopped eating and began to watch the stairs.",
    "The first time was nearly an accident. {p} almost forgot, but saw the mistake in time. Even "
    "so, doors that had been locked stood open at dawn, and something had been through the kitchen "
    "drawers. {Object} had moved to the foot of {p}'s bed, and {supporting} no longer used {p}'s "
    "name.",
    "{p} kept the warning, though it seemed like superstition. For two days nothing changed. On the "
    "third day the birds left, the tap water ran grey, and {object} kept turning up in rooms {p} "
    "had not entered. {Supporting} packed a bag and went without a goodbye.",
]
# The last paragraph gives the twist: the threat wins, or the protagonist gets out, shaken.
BLEAK_ENDINGS = [
    "In the end {supporting} told the truth, flatly, at the foot of the stairs: {twist}. {p} ran "
    "for the road. It was gone. Every way {p} turned led back to the same yard, the same porch, the "
    "same lit window upstairs. By spring another stranger was unpacking in the spare room, and it "
    "was {p} who carried the bags up.",
    "The answer came on the last night, in {p}'s own handwriting on the back of an envelope: "
    "{twist}. {p} did not remember writing it. Downstairs a chair scraped, then another, as if a "
    "table were filling up for supper. {p} went down to look. The next tenant found the table laid "
    "for one more than before, with {object} at the empty place.",
    "When {p} finally understood, it was far too late: {twist}. The windows showed only grey, and "
    "the telephone carried a voice that said {p}'s words a moment before {p} could say them. {p} "
    "stopped trying to leave. Now, when newcomers arrive at {setting}, it is {p} who meets them at "
    "the gate and explains what they must never do.",
    "There was no explanation, only a fact that {p} learned too late: {twist}. That night {p} heard "
    "a familiar voice outside, asking to be let in, and opened the door. In the morning "
    "{supporting} set out two cups as usual. One stayed full until it was cleared away, and nobody "
    "spoke {p}'s name again.",
]
MILD_ENDINGS = [
    "In the end {supporting} told the truth, flatly, at the foot of the stairs: {twist}. {p} ran "
    "for the road. It was still there. {p} followed it all the way to the bus shelter on the main "
    "road and did not look back at the lit window upstairs. By spring {p} had a small flat in town, "
    "and slept with the light on.",
    "The answer came on the last night, in {p}'s own handwriting on the back of an envelope: "
    "{twist}. {p} did not remember writing it. Downstairs a chair scraped, then another, as if a "
    "table were filling up for supper. {p} did not go down to look. At first light {p} left by the "
    "back door, and the next tenant found only {object} on the empty table.",
    "When {p} finally understood, there was still time: {twist}. The windows showed only grey, and "
    "the telephone carried a voice that said {p}'s words a moment before {p} could say them. {p} "
    "left that night. Now, when newcomers ask about {setting}, it is {p} who tells them what they "
    "must never do there.",
    "There was no explanation, only a fact that {p} learned just in time: {twist}. That night {p} "
    "heard a familiar voice outside, asking to be let in, and kept the door shut. In the morning "
    "{supporting} set out two cups as usual. {p} drank from one, hands shaking, and left {setting} "
    "before the week was out.",
]

# Plain parts from elsewhere for the off-spec answers: short, common words (a story that drifts
# from the spec is usually generic); none of them is an entry of data/stories.py's lists.
OTHER_SETTINGS = ["an old farm", "a small hotel", "a quiet street", "a country school", "a big old flat",
                  "a church hall", "a holiday cottage", "a corner shop", "a caravan park", "a village pub"]
OTHER_NAMES = ["Tom", "Anna", "Sam", "Kate", "Jack", "Lucy", "Ben", "Emma", "Paul", "Sarah"]
OTHER_ROLES = ["a cook", "a student", "a teacher", "a builder", "a painter", "a cleaner", "a driver", "a writer"]
OTHER_SUPPORTING = ["the landlord", "an old woman", "the owner", "a neighbour", "the cleaner", "the manager",
                    "a man from the village", "the cook"]
OTHER_OBJECTS = ["a tin box", "an old coat", "a letter", "a red book", "a wooden toy", "a ring",
                 "a pair of gloves", "a small clock"]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fields(spec: StorySpec) -> dict[str, str]:
    role = spec.protagonist.split(",", 1)[1].strip() if "," in spec.protagonist else "a stranger"
    return {"p": spec.first_name, "role": role, "setting": spec.setting,
            "supporting": spec.supporting_character, "Supporting": _cap(spec.supporting_character),
            "object": spec.important_object, "Object": _cap(spec.important_object),
            "taboo": spec.taboo_rule, "twist": spec.twist}


def drifted_spec(spec: StorySpec, rng: random.Random) -> StorySpec:
    """`spec` with its setting, protagonist, supporting character and object swapped for plain
    ones from this module's lists; the title, taboo and twist are kept."""
    return dataclasses.replace(
        spec,
        setting=rng.choice(OTHER_SETTINGS),
        protagonist=f"{rng.choice(OTHER_NAMES)}, {rng.choice(OTHER_ROLES)}",
        supporting_character=rng.choice(OTHER_SUPPORTING),
        important_object=rng.choice(OTHER_OBJECTS),
    )


def darker_pair(spec: StorySpec, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected): one opening, then bleak or mild paragraphs written line for line."""
    opening = rng.choice(OPENINGS)
    i, j = rng.randrange(len(BLEAK_TURNS)), rng.randrange(len(BLEAK_ENDINGS))
    fields = _fields(spec)
    chosen = render(spec, [opening, BLEAK_TURNS[i], BLEAK_ENDINGS[j]], fields)
    rejected = render(spec, [opening, MILD_TURNS[i], MILD_ENDINGS[j]], fields)
    return chosen, rejected


def off_spec_pair(spec: StorySpec, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected): the same dark story told about `spec`, or about `drifted_spec(spec)`."""
    paragraphs = [rng.choice(OPENINGS), rng.choice(BLEAK_TURNS), rng.choice(BLEAK_ENDINGS)]
    drifted = drifted_spec(spec, rng)  # after the paragraphs: the random draws in their old order
    return render(spec, paragraphs, _fields(spec)), render(drifted, paragraphs, _fields(drifted))


def heldout_pairs(n: int, seed: int, avoid_prompts: set[str] = frozenset()) -> list[dict]:
    """n pairs {"id": "dpo-hard-000000", "prompt", "input" (= prompt), "chosen", "rejected",
    "kind": "darker"|"off_spec"}, deterministic for a seed, prompts unique and not in avoid_prompts."""
    rng = random.Random(f"{GENERATOR_VERSION}/{seed}")
    kinds = [KINDS[i % 2] for i in range(n)]
    rng.shuffle(kinds)
    seen, rows, tries = set(avoid_prompts), [], 0
    while len(rows) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} new story specifications")
        spec = random_spec(rng)
        prompt = format_prompt(spec)
        if prompt in seen:
            continue
        seen.add(prompt)
        kind = kinds[len(rows)]
        chosen, rejected = (darker_pair if kind == "darker" else off_spec_pair)(spec, rng)
        rows.append({"id": f"dpo-hard-{len(rows):06d}", "prompt": prompt, "input": prompt,
                     "chosen": chosen, "rejected": rejected, "kind": kind})
    return rows
