#!/usr/bin/env python
"""Check training checkpoints without building a model.

    verify.py DIR            a --save directory: every iter_* checkpoint in it (the one its
                             pointer names is marked); or one tag directory
    verify.py DIR --latest   only the checkpoint the pointer names

For each checkpoint: its manifest (every file's size and CRC-32 per 16 MiB chunk) against the
files, and the files its run state implies (for each tensor-parallel rank the model states and
one file per MoE layer and global expert; an RNG file per rank). Files the manifest does not
list are noted, not counted as damage.
Checkpoints written before manifests existed are checked for completeness only and reported as
unverified.

Prints one line per checkpoint (OK / UNVERIFIED / DAMAGED with the first problem, and every
further problem indented under it); exits 0 when every checked checkpoint is usable, 1 when one
is damaged, 2 on a bad argument (the directory is not a checkpoint). `--json FILE` writes the
report as JSON too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_selfroute.checkpoint import CheckpointFormatError  # noqa: E402
from megatron_selfroute.checkpoint.files import (  # noqa: E402
    MODEL_STATES,
    POINTER,
    RUN_STATE,
    checkpoint_tags,
    expert_file,
    rng_file,
)
from megatron_selfroute.checkpoint.manifest import problems, read, unlisted  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a --save directory or one checkpoint (tag) directory")
    p.add_argument("--latest", action="store_true", help="only the checkpoint the pointer names")
    p.add_argument("--json", default=None, help="also write the report here")
    return p.parse_args(argv)


def expected_files(tag_dir: str) -> list[str]:
    """Files the run state implies (a missing one makes the checkpoint unusable)."""
    from megatron_selfroute.config import Config

    path = os.path.join(tag_dir, RUN_STATE)
    try:
        with open(path) as f:
            state = json.load(f)
        cfg = Config.from_dict(state["config"])
        world = int(state["world_size"])
        tp = int((state.get("layout") or {}).get("tp", 1))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{path}: not a run state of this project ({e})") from None
    per_tp = [MODEL_STATES]  # every tensor-parallel rank writes its own mp_rank_XX files
    if cfg.moe.is_moe:
        moe_layers = sum(cfg.moe.layer_pattern(cfg.model.num_layers))
        per_tp += [expert_file(layer, e) for layer in range(moe_layers)
                   for e in range(cfg.moe.num_experts)]
    names = [n.replace("mp_rank_00", f"mp_rank_{r:02d}") for r in range(tp) for n in per_tp]
    return names + [rng_file(r) for r in range(world)]


def check_tag(tag_dir: str) -> dict:
    """{"status": OK|UNVERIFIED|DAMAGED, "problems": [...]} of one checkpoint directory."""
    try:
        found = [os.path.join(tag_dir, n) + ": missing" for n in expected_files(tag_dir)
                 if not os.path.isfile(os.path.join(tag_dir, n))]
        found += problems(tag_dir)
        doc = read(tag_dir)
        verified = doc is not None
        notes = unlisted(tag_dir, doc) if doc is not None else []
    except CheckpointFormatError as e:
        found, verified, notes = [str(e)], False, []
    status = "DAMAGED" if found else ("OK" if verified else "UNVERIFIED")
    return {"status": status, "problems": found, "notes": notes}


def verify(path: str, latest: bool) -> dict[str, dict]:
    if not os.path.isdir(path):
        raise CheckpointFormatError(f"{path}: not a directory")
    if os.path.isfile(os.path.join(path, RUN_STATE)):
        return {path: check_tag(path)}
    pointer_path = os.path.join(path, POINTER)
    pointed = None
    if os.path.isfile(pointer_path):
        with open(pointer_path) as f:
            pointed = f.read().strip()
    tags = checkpoint_tags(path)
    if not tags and pointed is None:
        raise CheckpointFormatError(f"{path}: neither a checkpoint ({RUN_STATE}) nor a --save "
                                    f"directory ({POINTER} or iter_* directories)")
    report = {}
    if pointed is not None and pointed not in tags:
        report[os.path.join(path, pointed)] = {
            "status": "DAMAGED", "pointer": True,
            "problems": [f"{pointer_path} names {pointed!r}, which is not a checkpoint directory"]}
    for tag in tags:
        if latest and tag != pointed:
            continue
        report[os.path.join(path, tag)] = dict(check_tag(os.path.join(path, tag)),
                                               pointer=tag == pointed)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        report = verify(args.path, args.latest)
    except CheckpointFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for tag_dir, res in report.items():
        mark = "  <- pointer" if res.get("pointer") else ""
        first = f": {res['problems'][0]}" if res["problems"] else ""
        print(f"{res['status']:10s} {tag_dir}{mark}{first}")
        for more in res["problems"][1:]:
            print(f"           {more}")
        for note in res.get("notes", []):
            print(f"           note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    sys.exit(1 if any(r["status"] == "DAMAGED" for r in report.values()) else 0)


if __name__ == "__main__":
    main()
