#!/usr/bin/env python
"""Merge reference-model builds into benchmarks/results/reference_models.json and recompute its summary.

    python scripts/collect_reference_records.py base=/path/to/base/build_records.json small=... [--note "..."]

Each NAME=PATH replaces that model's rows with the records `build_reference.py` wrote (build_records.json) and,
when a README.md lies next to them, the training facts of its card (steps, wall seconds, parameters). Models not
named keep their rows. The summary holds, per language model, held-out perplexity, the unigram baseline, their
ratio, needle recall (and whether the 0.95 goal is met for the GPU models), multi-turn recall and the command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "reference_models.json"
NEEDLE_GOAL = 0.95
TRAIN_FACTS = {  # regex over the card -> key
    "train_steps": r"\*\*Training\*\*: (\d+) steps",
    "train_seconds": r"\), ([\d.]+) s wall",
    "params": r"with ([\d,]+) parameters",
}


def card_facts(card: Path) -> dict:
    if not card.exists():
        return {}
    text = card.read_text()
    facts = {}
    for key, pattern in TRAIN_FACTS.items():
        m = re.search(pattern, text)
        if m:
            facts[key] = float(m.group(1).replace(",", "")) if "." in m.group(1) else int(m.group(1).replace(",", ""))
    return facts


def summarize(rows: dict, train: dict) -> dict:
    summary, commands, devices, versions = {}, {}, {}, {}
    for name, records in rows.items():
        if not isinstance(records, list):  # the diffusion reference keeps its own record layout
            commands[name] = records.get("command")
            devices[name] = records.get("device")
            continue
        by = {r["metric"]: r for r in records if "metric" in r}
        ppl, uni = by.get("heldout_perplexity"), by.get("unigram_heldout_perplexity")
        if ppl:
            summary[f"{name}_heldout_perplexity"] = round(ppl["value"], 3)
            commands[name] = ppl["command"]
            devices[name] = ppl["versions"]["device"]
            versions[name] = ppl["versions"]
        if uni:
            summary[f"{name}_unigram_heldout_perplexity"] = round(uni["value"], 3)
        if ppl and uni:
            summary[f"{name}_perplexity_ratio_vs_unigram"] = round(uni["value"] / ppl["value"], 2)
        if "needle_recall" in by:
            summary[f"{name}_needle_recall"] = by["needle_recall"]["value"]
            if devices.get(name, "cpu") != "cpu" and name != "draft":  # drafts and CPU models are not held to it
                summary[f"{name}_needle_goal_met"] = by["needle_recall"]["value"] >= NEEDLE_GOAL
        for turn in (1, 2):
            if f"multi_turn_recall_turn{turn}" in by:
                summary[f"{name}_multi_turn_recall_turn{turn}"] = by[f"multi_turn_recall_turn{turn}"]["value"]
        for key, value in train.get(name, {}).items():
            summary[f"{name}_{key}"] = value
    summary.update(needle_goal=NEEDLE_GOAL, gpu=sorted({d for d in devices.values() if d and d != "cpu"}),
                   devices=devices, versions=versions, commands=commands)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="NAME=path/to/build_records.json")
    ap.add_argument("--note", help="a sentence for the summary (what is stale or not yet valid)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    for item in args.builds:
        name, _, path = item.partition("=")
        records = json.loads(Path(path).read_text())
        data["rows"][name] = records
        data.setdefault("train", {})[name] = card_facts(Path(path).with_name("README.md"))
    summary = summarize(data["rows"], data.get("train", {}))
    summary["date"] = datetime.date.today().isoformat()
    if args.note:
        summary["note"] = args.note
    data["summary"] = summary
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("commands", "devices", "versions")}, indent=2))


if __name__ == "__main__":
    main()
