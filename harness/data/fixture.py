"""The fixture datasets, generated from templates written for this project: dialogue-summary
pairs (data=fixture) and instruction-input-output records (data=instructions).

They stand in for SAMSum and for instruction data such as dolly-15k offline (SAMSum's licence
forbids redistributing its text). Every summary or output is a fixed function of what its
dialogue or instruction states, so a tiny model can learn the mapping in a few hundred steps, and
the same seed always gives the same rows.
"""

import random

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Gus", "Hana", "Ivan", "Jo",
         "Kemal", "Lena", "Mira", "Nils", "Omar", "Pia"]
PLACES = ["the library", "the station", "the gym", "the park", "the office", "the market"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["9 am", "10 am", "noon", "2 pm", "4 pm", "6 pm", "8 pm"]
ITEMS = ["the keys", "a charger", "the tickets", "an umbrella", "the report", "some bread"]
DISHES = ["pizza", "soup", "curry", "salad", "noodles", "tacos"]

# Each template: (dialogue lines, summary). Fields: {a} {b} speakers, {place} {day} {time} {item}
# {dish}. The summary restates the dialogue's facts in a fixed shape.
TEMPLATES = [
    (["{a}: Are we still meeting at {place} on {day}?",
      "{b}: Yes, I will be there at {time}.",
      "{a}: Great, see you then."],
     "{a} and {b} will meet at {place} on {day} at {time}."),
    (["{a}: Did you take {item} this morning?",
      "{b}: No, I left {item} at {place}.",
      "{a}: Ok, I will pick it up on {day}."],
     "{b} left {item} at {place}. {a} will pick it up on {day}."),
    (["{a}: What should we cook tonight?",
      "{b}: How about {dish}?",
      "{a}: Sounds good, I will buy what we need at {place}."],
     "{a} and {b} will cook {dish}. {a} will shop at {place}."),
    (["{a}: I am running late, sorry.",
      "{b}: No problem. When will you get to {place}?",
      "{a}: Around {time}, I think."],
     "{a} is late and will get to {place} around {time}."),
    (["{a}: Can you bring {item} on {day}?",
      "{b}: Sure, I will bring {item}.",
      "{a}: Thanks a lot!"],
     "{b} will bring {item} for {a} on {day}."),
    (["{a}: The meeting on {day} moved to {time}.",
      "{b}: Is it still at {place}?",
      "{a}: Yes, same place."],
     "The meeting on {day} is now at {time} at {place}."),
]


def make_rows(count: int, seed: int, id_prefix: str) -> list[dict]:
    """`count` rows with columns id, dialogue, summary; the same (count, seed) gives the same
    rows."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        dialogue_lines, summary = rng.choice(TEMPLATES)
        a, b = rng.sample(NAMES, 2)
        facts = dict(a=a, b=b, place=rng.choice(PLACES), day=rng.choice(DAYS),
                     time=rng.choice(TIMES), item=rng.choice(ITEMS), dish=rng.choice(DISHES))
        rows.append({"id": f"{id_prefix}-{index:04d}",
                     "dialogue": "\n".join(line.format(**facts) for line in dialogue_lines),
                     "summary": summary.format(**facts)})
    return rows


# Instruction records: (instruction, input, output) templates; an empty input is the alpaca
# records' "no input" case. Fields as above.
INSTRUCTIONS = [
    ("Say where and when {a} and {b} meet.", "{a} meets {b} at {place} on {day}.",
     "At {place} on {day}."),
    ("Name the dish in the sentence.", "{a} will cook {dish} for {b} tonight.", "{dish}"),
    ("Write a one-line reminder for {a} to bring {item} on {day}.", "",
     "{a}: bring {item} on {day}."),
    ("Who is late, and until when?", "{b} wrote that {a} will get to {place} around {time}.",
     "{a}, until {time}."),
    ("Suggest a place for {a} to meet {b}.", "", "{a} could meet {b} at {place}."),
]


def make_instruction_rows(count: int, seed: int, id_prefix: str) -> list[dict]:
    """`count` rows with columns id, instruction, input, output."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        templates = rng.choice(INSTRUCTIONS)
        a, b = rng.sample(NAMES, 2)
        facts = dict(a=a, b=b, place=rng.choice(PLACES), day=rng.choice(DAYS),
                     time=rng.choice(TIMES), item=rng.choice(ITEMS), dish=rng.choice(DISHES))
        instruction, given, output = (template.format(**facts) for template in templates)
        rows.append({"id": f"{id_prefix}-{index:04d}", "instruction": instruction,
                     "input": given, "output": output})
    return rows


def make_splits(train_size: int, validation_size: int, test_size: int, seed: int,
                rows=make_rows) -> dict:
    """The three splits, each drawn from its own seed so that resizing one leaves the others;
    `rows` makes them (make_rows or make_instruction_rows)."""
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    return {split: rows(size, seed=seed * 1000 + offset, id_prefix=split)
            for offset, (split, size) in enumerate(sizes.items())}
