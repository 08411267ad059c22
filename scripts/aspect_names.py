#!/usr/bin/env python3
"""How many global aspects of a memory store name a product rather than an attribute.

Usage: scripts/aspect_names.py STORE.sqlite [STORE.sqlite ...] [--meta META.jsonl]

An aspect name counts as copied from a product when it contains a digit or when three or more
of its words (the last word dropped when the name was cut at 32 characters) occur verbatim,
case-insensitively, in the title of an item of the catalogue. Brands are not counted by rule
(the Amazon Reviews 2023 sample has no `store` values); read the printed names for those.
"""
import json
import re
import sqlite3
import sys

args = sys.argv[1:]
meta = "../shared/data/amazon23-mini/meta.jsonl"
if "--meta" in args:
    i = args.index("--meta")
    meta = args[i + 1]
    del args[i : i + 2]
titles = "\n".join(
    (json.loads(line).get("title") or "").lower() for line in open(meta, encoding="utf-8")
)


def copied(name):
    why = []
    if re.search(r"\d", name):
        why.append("digits")
    words = name.split()
    kept = words[:-1] if len(name) >= 31 else words
    if len(kept) >= 3 and " ".join(kept).lower() in titles:
        why.append("title words")
    return why


for store in args:
    rows = sqlite3.connect(store).execute("select category, name from global_aspects").fetchall()
    hits = [(c, n, copied(n)) for c, n in rows]
    hits = [h for h in hits if h[2]]
    print(f"{store}: {len(hits)} of {len(rows)} global aspects copied from a product")
    for c, n, why in hits:
        print(f"  {c}: {n!r} ({', '.join(why)})")
    print("  all names: " + "; ".join(n for _, n in rows))
