"""Offline story-specification data: spec -> short horror story, and dark-vs-wholesome pairs.

A spec is drawn from large part lists (title, setting, protagonist, supporting character,
important object, taboo rule, twist), so a thousand prompts are nearly all distinct. Each story
has three paragraphs: an opening shared by both endings, then either a darker turn with an
unsettling end (`chosen`, and the SFT response) or a wholesome turn where the fear is resolved
(`rejected`), or the milder, uneasy turn the SFT answers take. All endings are built from
sentence templates of the same shape, so the answers are about the same length and length is
not the preference signal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GENERATOR_VERSION = "stories-3"

TITLE_ADJ = [
    "Silent", "Hollow", "Salt", "Last", "Quiet", "Drowned", "Paper", "Winter", "Glass", "Ninth",
    "Borrowed", "Crooked", "Sleeping", "Ashen", "Lantern", "Forgotten", "Velvet", "Iron",
    "Midnight", "Patient", "Empty", "Northern", "Faded", "Second", "Stillwater",
]
TITLE_NOUN = [
    "Lighthouse", "Guest", "Orchard", "Hallway", "Choir", "Tenant", "Well", "Signal", "Portrait",
    "Ferry", "Nursery", "Archive", "Bell", "Harvest", "Station", "Attic", "Garden", "Lullaby",
    "Mirror", "Room", "Tide", "Caller", "Inheritance", "Shift", "Neighbour",
]
SETTINGS = [
    "a lighthouse on an island the ferry no longer visits", "a night train stalled in a snowfield",
    "a hospital ward closed for renovation", "a farmhouse at the end of a flooded road",
    "a boarding school emptied for the winter holidays", "a radio station on a mountain ridge",
    "a seaside hotel in the off season", "a research base on the polar ice",
    "an apartment block where every other flat is vacant", "a village whose church bell never rings",
    "a museum after closing time", "a mining town with one working streetlight",
    "a houseboat moored in thick fog", "a roadside motel with a broken neon sign",
    "a library built over an old cemetery", "a summer camp in the week after it closed",
    "a ski lodge cut off by an avalanche", "a greenhouse in a walled garden",
    "a ferry crossing a lake at midnight", "a monastery high in the hills",
    "a shopping mall during a blackout", "a cottage on the edge of a peat bog",
    "an observatory on a cloudy night", "a subway platform after the last train",
    "a dairy farm during a long drought", "a care home on a windy cliff",
    "a theatre on the night of its final show", "a fishing village in a week of fog",
    "a family cabin by a frozen lake", "an office tower on a holiday weekend",
]
FIRST_NAMES = [
    "Mara", "Elias", "Nora", "Tobias", "Ines", "Callum", "Ruth", "Jonah", "Aiko", "Felix",
    "Helena", "Idris", "Vera", "Samir", "Lucia", "Owen", "Priya", "Matteo", "Greta", "Silas",
    "Dana", "Kofi", "Lena", "Arthur", "Maya", "Hugo", "Tess", "Rafael", "Yara", "Emmett",
]
ROLES = [
    "a night-shift nurse", "a retired schoolteacher", "a lighthouse keeper", "a young archivist",
    "a radio technician", "a grieving widower", "a travelling piano tuner", "a trainee doctor",
    "a night watchman", "a schoolgirl of twelve", "a locksmith", "a museum guard",
    "a translator on holiday", "a surveyor", "a veterinarian", "a postwoman", "a chef",
    "a night-bus driver", "a student of folklore", "a hotel receptionist",
]
SUPPORTING = [
    "a neighbour who only knocks after dark", "a little brother who stopped speaking last spring",
    "the caretaker who never blinks", "an old friend who arrives uninvited",
    "a child who hums the same four notes", "a landlady who counts the spoons every evening",
    "a stranger who knows the protagonist's name", "a grandmother who sleeps with her eyes open",
    "a dog that will not enter the house", "a priest who refuses to ring the bell",
    "a colleague who keeps the radio on all night", "a twin sister who lives abroad",
    "a doctor who writes everything down twice", "a boy who collects keys",
    "a ferryman who never takes payment", "a cat that watches the ceiling",
    "a retired detective with a shaking hand", "a gardener who buries things at night",
    "a cousin who smiles too long", "a nurse who works only on the night of the full moon",
]
OBJECTS = [
    "a music box that plays a little too slowly", "a key that fits no door in the building",
    "a photograph with one face scratched out", "a wristwatch that runs backwards",
    "a jar of salt left on every windowsill", "a wedding veil folded in a drawer",
    "a radio that picks up a station that does not exist", "a child's drawing of the house",
    "a lantern with a cracked red glass", "a diary written in the protagonist's handwriting",
    "a porcelain doll with wet hair", "a compass that points toward the cellar",
    "a cassette tape labelled with tomorrow's date", "a bell with no clapper",
    "a mirror covered with a grey sheet", "a knitted glove for a very small hand",
    "a ledger of names and dates", "a locket that is warm to the touch",
    "a telephone that rings with no line connected", "a painting of the view from the window",
]
TABOOS = [
    "never answer the door after midnight", "never say the old name of the house aloud",
    "never look into the mirror after dark", "never let the lantern go out",
    "never open the cellar, whatever you hear", "never count the stairs on the way down",
    "never reply when someone calls from the water", "never sleep with the window open",
    "never move the salt from the windowsills", "never wind the music box",
    "never walk the east corridor alone", "never speak to the guest in room nine",
    "never take the photograph out of its frame", "never turn around when the bell rings",
    "never leave a plate unwashed overnight", "never follow the humming",
    "never read the last page of the diary", "never invite anyone past the threshold",
    "never switch off the radio", "never use the lift after the lights dim",
]
TWISTS = [
    "the protagonist has been gone for a long time and the house has been waiting",
    "the supporting character died years ago", "the voice on the radio is the protagonist's own",
    "the rule was written to keep something in, not out",
    "the protagonist wrote the warning but does not remember it",
    "every other guest is wearing the faces of people who left",
    "the important object belongs to the protagonist's future self",
    "the house remembers everyone who ever broke the rule",
    "the caretaker is the last one of them who is still human",
    "the protagonist is the one being haunted by the living",
    "the calendar has been repeating the same night for years",
    "the supporting character has been protecting the protagonist all along",
    "the missing person never left the building",
    "the map in the hallway shows a room that is not there in daylight",
    "the protagonist's reflection has been acting on its own",
]
CONSTRAINTS = [
    "2-4 paragraphs",
    "suspenseful, not graphic",
    "end on an unsettling note",
]

# Sentence templates. `{p}` protagonist's first name, `{P}` full protagonist text, and the
# spec fields by name. The dark and wholesome middles/endings come in matched shapes.
OPENINGS = [
    "{p} had come to {setting} because there was nowhere else to go. {P_cap}, was the only "
    "description anyone would give, and the people who lived there repeated one rule before "
    "anything else: {taboo}. {Supporting_cap} said it too, in a flat and careful voice, while "
    "{p} unpacked {object} and set it on the table.",
    "The first night at {setting}, {p} found {object} waiting on the kitchen table. Nobody "
    "admitted to leaving it there. The only instruction pinned to the door was short: {taboo}. "
    "{Supporting_cap} read it over {p}'s shoulder and nodded, as if it were the most ordinary "
    "thing in the world.",
    "Nobody at {setting} had asked for {p}, {P_role}, but {p} arrived all the same, carrying "
    "{object} wrapped in an old scarf. {Supporting_cap} met the car at the gate and said only "
    "one thing before turning away: {taboo}. The words were said kindly, and that was worse.",
    "It rained the evening {p} reached {setting}. The lights flickered once, then steadied. "
    "{Supporting_cap} handed over a ring of keys and {object}, and added, almost as an "
    "afterthought, the house rule: {taboo}. {p} laughed, and nobody laughed back.",
]
DARK_MIDDLES = [
    "For three nights {p} obeyed. On the fourth, the dread became unbearable, and {p} broke the "
    "rule. Nothing happened at first. Then {object} began to rot in small, terrible ways, the "
    "hallway filled with a sick, cold air, and something in the dark started to whisper {p}'s "
    "name, hungry and afraid of nothing, from a little closer every hour, and {p} was too terrified "
    "to scream.",
    "The rule held until a storm took the power. In the darkness {p} forgot, or chose to forget, "
    "and broke it. Afterwards {supporting} would not meet {p}'s eyes, the shadows in the corners "
    "crept nearer like something wounded and cruel, and {object} was never where it had been left. "
    "The dread was unbearable.",
    "{p} meant to be careful, but the whispering under the floor was so soft and so desperate "
    "that breaking the rule felt like a mistake {p} could not stop. The next morning the windows "
    "were smeared from the inside. {Supporting_cap} had gone grey with fear, and {object} was "
    "cold and wet as a dead thing dragged from the bottom of a well. Nobody was safe now.",
]
LIGHT_MIDDLES = [
    "For three nights {p} obeyed. On the fourth, curiosity won, and {p} broke the rule. Nothing "
    "happened at first. Then {supporting} appeared with a lamp and a tired smile, explained the "
    "old story behind {object}, and the two of them talked warmly in the hallway until the "
    "fear felt almost silly.",
    "The rule held until a storm took the power. In the darkness {p} forgot and broke it. "
    "Afterwards {supporting} only laughed, lit a row of candles, and showed {p} that {object} "
    "had a simple, sensible story of its own. The shadows in the corners looked small and "
    "friendly by candlelight.",
    "{p} meant to be careful, but the noise under the floor was so persistent that breaking the "
    "rule felt necessary. The next morning the sun came up bright and clear. {Supporting_cap} "
    "was cheerful at breakfast, and {object} turned out to be a gift that someone had "
    "meant for {p} all along.",
]
DARK_ENDINGS = [
    "By the end of the week {p} understood the horrible truth: {twist}. The rule had never been "
    "meant to save {p}. That night the house went dead still, and from somewhere behind the "
    "walls came a slow, terrible knocking that did not stop when {p} screamed, and never "
    "would again. The horror had only begun.",
    "It was {supporting} who finally said it aloud, weeping: {twist}. {p} tried to run, but the "
    "doors opened onto the same dark hallway, again and again, until hope was gone. In the "
    "morning the bed was empty, {object} lay broken on the pillow, and no one at {setting} "
    "remembered that {p} had ever lived. Only the fear remained.",
    "The last page of the story was written in a hand {p} knew too well, and it said only this: "
    "{twist}. Outside, the light died. Inside, something began to hum the same four notes, "
    "very close, and when {p} turned around in terror, the room was exactly as empty as "
    "before, and not empty at all. Nobody heard {p} cry, and nobody ever would.",
]
LIGHT_ENDINGS = [
    "By the end of the week {p} understood the truth. For one awful moment it had seemed that "
    "{twist}, but it was only an old story told to frighten visitors. That night the house was "
    "warm and peaceful, {supporting} made cocoa, and {p} slept soundly until the sun came up, "
    "happy to belong somewhere at last.",
    "It was {supporting} who finally explained it aloud, laughing: people used to believe that "
    "{twist}. {p} laughed too. The doors opened onto a bright garden, the morning smelled of "
    "bread, {object} went up on the mantelpiece, and everyone at {setting} welcomed {p} like "
    "an old friend.",
    "The last page of the story was written in a kind, familiar hand, and it explained that "
    "the old rumour, that {twist}, had never been true. Outside, the sun broke through the "
    "clouds. Inside, someone was humming a cheerful tune, and when {p} turned around, the "
    "whole family was there, smiling, ready for breakfast.",
]

# The SFT stories are suspenseful but end in an open, uneasy way: darker than the wholesome
# answers and milder than the dark ones, so DPO has room to move the model either way.
PLAIN_MIDDLES = [
    "For three nights {p} obeyed. On the fourth, {p} hesitated at the edge of the rule, afraid, "
    "and almost broke it. The hallway felt colder than it should, {object} seemed heavier in the "
    "morning, and {supporting} watched {p} at breakfast without saying a word, as if something "
    "were wrong.",
    "The rule held until a storm took the power. In the darkness {p} stood very still, "
    "listening, afraid to breathe, and kept the rule by a single breath. Afterwards {supporting} "
    "asked what {p} had heard, and {object} was lying on the floor, though nobody had touched it.",
    "{p} tried to be careful, but the noises at night were hard to ignore, and once {p} came "
    "close to breaking the rule. The next morning there were strange marks on the windows that "
    "nobody could explain. {Supporting_cap} said it was the wind, but looked afraid, and put "
    "{object} back in its place.",
]
PLAIN_ENDINGS = [
    "By the end of the week {p} began to suspect, with a growing dread, that {twist}. Nobody at "
    "{setting} would say whether it was true. {p} kept the rule, kept {object} close, and lay "
    "awake each night, listening to the house settle and wondering what it was waiting for.",
    "It was {supporting} who hinted at it first: {twist}. {p} did not know what to believe, and "
    "the fear did not leave. The doors still opened, the mornings still came, but {p} started "
    "leaving a light on, and {object} was always the first thing {p} checked on waking.",
    "The last page of the story held a single line that {p} could not forget: {twist}. Maybe "
    "it was only an old story. {p} closed the book, switched off the lamp, and listened for a "
    "long time to the uneasy silence at {setting} before a troubled sleep finally came.",
]


@dataclass(frozen=True)
class StorySpec:
    title: str
    setting: str
    protagonist: str
    supporting_character: str
    important_object: str
    taboo_rule: str
    twist: str

    @property
    def first_name(self) -> str:
        return self.protagonist.split(",")[0].split()[0]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def random_spec(rng: random.Random) -> StorySpec:
    first = rng.choice(FIRST_NAMES)
    return StorySpec(
        title=f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}",
        setting=rng.choice(SETTINGS),
        protagonist=f"{first}, {rng.choice(ROLES)}",
        supporting_character=rng.choice(SUPPORTING),
        important_object=rng.choice(OBJECTS),
        taboo_rule=rng.choice(TABOOS),
        twist=rng.choice(TWISTS),
    )


def format_prompt(spec: StorySpec) -> str:
    """The SFT/DPO prompt: the spec as a writing brief, ending with 'Story:'."""
    lines = [
        "Write a short horror story that follows this story specification.",
        "",
        f"Title: {spec.title}",
        f"Setting: {spec.setting}",
        f"Protagonist: {spec.protagonist}",
        f"Supporting character: {spec.supporting_character}",
        f"Important object: {spec.important_object}",
        f"Taboo rule: {_cap(spec.taboo_rule)}",
        f"Twist: {_cap(spec.twist)}",
        "",
        "Constraints:",
        *(f"- {c}" for c in CONSTRAINTS),
        "",
        "Story:",
    ]
    return "\n".join(lines)


def _fields(spec: StorySpec) -> dict[str, str]:
    role = spec.protagonist.split(",", 1)[1].strip() if "," in spec.protagonist else spec.protagonist
    return {
        "p": spec.first_name,
        "P_cap": _cap(spec.protagonist),
        "P_role": role,
        "setting": spec.setting,
        "supporting": spec.supporting_character,
        "Supporting_cap": _cap(spec.supporting_character),
        "object": spec.important_object,
        "taboo": spec.taboo_rule,
        "twist": spec.twist,
    }


def render(spec: StorySpec, paragraphs: list[str], fields: dict | None = None) -> str:
    """The story: its title, then each paragraph template filled with `fields` (default: this
    module's fields of `spec`), a blank line between."""
    f = _fields(spec) if fields is None else fields
    return spec.title + "\n\n" + "\n\n".join(p.format(**f) for p in paragraphs)


def write_story(spec: StorySpec, rng: random.Random) -> str:
    """The SFT answer: three paragraphs using every field of `spec`, title first."""
    return render(spec, [rng.choice(OPENINGS), rng.choice(PLAIN_MIDDLES), rng.choice(PLAIN_ENDINGS)])


def story_pair(spec: StorySpec, rng: random.Random) -> tuple[str, str, str]:
    """(chosen, rejected, rejected_kind): the same opening, then a dark turn for `chosen`; for
    `rejected` a turn of matched shape that is either wholesome (the fear resolved) or `mild`,
    the uneasy register of the SFT answers. A model fine-tuned on those answers prefers the mild
    one at first, so DPO's preference term has real work to do, not only the easy pairs."""
    opening = rng.choice(OPENINGS)
    i, j = rng.randrange(len(DARK_MIDDLES)), rng.randrange(len(DARK_ENDINGS))
    kind = rng.choice(("wholesome", "mild"))
    middles, endings = (LIGHT_MIDDLES, LIGHT_ENDINGS) if kind == "wholesome" else (PLAIN_MIDDLES, PLAIN_ENDINGS)
    chosen = render(spec, [opening, DARK_MIDDLES[i], DARK_ENDINGS[j]])
    rejected = render(spec, [opening, middles[i], endings[j]])
    return chosen, rejected, kind
