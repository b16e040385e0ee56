"""A device's private text: a local path on a real device, synthetic per-client text in simulation.

On a device the SuperNode is started with `--node-config 'data-path="/path/to/notes"'` (a text
file, a directory of text files or a Parquet file; see `storage.corpus`). In simulation each
virtual SuperNode has a `partition-id`, and `synthetic_documents` writes that user's assistant
log: every user shares the log's format and phrasing (what the federation can learn for
everyone), and has their own contacts, places and habits (what stays personal). None of it looks
like the Python documentation the base model was trained on.

The bytes never leave the device: only the BitDelta and a few metrics do.
"""

from __future__ import annotations

import random

from model.corpus import Corpus

NAMES = ("ada", "bruno", "chen", "dara", "elif", "femi", "gita", "hugo", "ines", "jun", "kofi", "lena",
         "mateo", "nia", "omar", "priya", "quinn", "rosa", "sami", "tove")
PLACES = ("the bakery", "the gym", "the office", "the station", "grandma's", "the library", "the park",
          "the clinic", "the market", "the school")
TASKS = ("water the ferns", "pay the rent", "call the plumber", "book the flights", "renew my passport",
         "buy a birthday gift", "back up the laptop", "walk the dog", "return the books", "fix the bike")
ITEMS = ("oat milk", "coffee beans", "rice", "apples", "batteries", "bread", "eggs", "lemons", "tea",
         "soap")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def synthetic_documents(partition_id: int, num_bytes: int, seed: int = 0) -> list[str]:
    """About `num_bytes` of one simulated user's assistant log, as documents of a few turns each.

    Deterministic in (partition_id, seed); every user favours a few names, places and tasks.
    """
    rng = random.Random(f"reverie-user-{partition_id}-{seed}")
    favourite = {kind: rng.sample(pool, 3) for kind, pool in
                 (("name", NAMES), ("place", PLACES), ("task", TASKS), ("item", ITEMS))}

    def pick(kind: str, pool: tuple[str, ...]) -> str:
        return rng.choice(favourite[kind]) if rng.random() < 0.8 else rng.choice(pool)

    documents, size = [], 0
    while size < num_bytes:
        turns = []
        for _ in range(rng.randint(2, 4)):
            hour, minute = rng.randint(6, 22), rng.choice((0, 15, 30, 45))
            day = rng.choice(DAYS)
            kind = rng.randrange(4)
            if kind == 0:
                task = pick("task", TASKS)
                ask, answer = f"remind me to {task} on {day}", f"okay, i will remind you to {task} on {day}."
            elif kind == 1:
                name, place = pick("name", NAMES), pick("place", PLACES)
                ask = f"when do i meet {name}?"
                answer = f"you meet {name} at {place} on {day} at {hour:02d}:{minute:02d}."
            elif kind == 2:
                item = pick("item", ITEMS)
                ask, answer = f"add {item} to my shopping list", f"added {item} to your shopping list."
            else:
                name = pick("name", NAMES)
                ask, answer = f"call {name}", f"calling {name} now."
            turns.append(f"[{hour:02d}:{minute:02d}] me: {ask}\n[{hour:02d}:{minute:02d}] reverie: {answer}\n")
        document = "".join(turns)
        documents.append(document)
        size += len(document)
    return documents


def synthetic_corpus(partition_id: int, num_bytes: int, seed: int = 0) -> Corpus:
    """One simulated user's text split into train and held-out (every 5th document held out)."""
    return Corpus.split(synthetic_documents(partition_id, num_bytes, seed), heldout_every=5)


def device_corpus(node_config: dict, num_bytes: int, seed: int = 0) -> Corpus:
    """This device's text: `data-path` if the SuperNode has one, else the simulated user's."""
    path = node_config.get("data-path")
    if path:
        from storage.corpus import read_documents  # noqa: PLC0415 - only real devices read files

        return Corpus.split(read_documents(str(path)), heldout_every=5)
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode has neither data-path nor partition-id in its node config; start it "
                         "with --node-config 'data-path=\"/path/to/text\"' (or partition-id=N to simulate)")
    return synthetic_corpus(int(node_config["partition-id"]), num_bytes, seed)
