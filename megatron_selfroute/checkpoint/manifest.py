"""The manifest of a checkpoint: every file's name, size and CRC-32 per 16 MiB chunk.

    iter_0000100/manifest.json
        {"format": "megatron_selfroute-manifest", "version": 1, "algorithm": "crc32",
         "chunk_bytes": 16777216, "files": {"mp_rank_00_model_states.pt":
                                             {"size": 123, "crc32": ["1a2b3c4d", ...]}, ...}}

Written by every save after all ranks wrote their files (each rank checksums a share of them)
and before the directory is renamed into place, so a directory the pointer names always has
one. CRC-32 runs at several GB/s (zlib), so verifying a GPT-2-small checkpoint with optimizer
states (~1.5 GB) takes well under a second of CPU per rank; the per-chunk sums name the damaged
region of a file, not only the file. Checkpoints written before manifests existed have none and
load unverified (their loader says so).
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Iterable, Optional

from megatron_selfroute.checkpoint import CheckpointFormatError

MANIFEST = "manifest.json"
FORMAT = "megatron_selfroute-manifest"
CHUNK = 16 << 20


def file_entry(path: str, chunk: int = CHUNK) -> dict:
    """{"size", "crc32": one hex sum per chunk} of one file."""
    sums = []
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            size += len(block)
            sums.append(f"{zlib.crc32(block):08x}")
    return {"size": size, "crc32": sums}


def listed_files(tag_dir: str) -> list[str]:
    """Every regular file of a tag directory, relative and sorted (the manifest itself and
    leftovers of interrupted writes excluded)."""
    out = []
    for root, _, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != MANIFEST and not name.endswith(".partial"):
                out.append(rel)
    return sorted(out)


def entries(tag_dir: str, names: Iterable[str]) -> dict[str, dict]:
    return {name: file_entry(os.path.join(tag_dir, name)) for name in names}


def write(tag_dir: str, files: dict[str, dict]) -> None:
    """Write the manifest (fsynced) into `tag_dir`."""
    doc = {"format": FORMAT, "version": 1, "algorithm": "crc32", "chunk_bytes": CHUNK,
           "files": dict(sorted(files.items()))}
    path = os.path.join(tag_dir, MANIFEST)
    head = json.dumps({k: v for k, v in doc.items() if k != "files"})[:-1]
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc["files"].items())
    with open(path, "w") as f:  # one line per file: readable and diffable
        f.write(f'{head}, "files": {{\n{body}\n}}}}\n')
        f.flush()
        os.fsync(f.fileno())


def read(tag_dir: str) -> Optional[dict]:
    """The manifest of `tag_dir`, None when it has none (a checkpoint older than manifests)."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
            raise ValueError("not a manifest of this project")
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: unreadable manifest ({e})") from None
    return doc


def check_file(tag_dir: str, name: str, want: dict, chunk: int) -> Optional[str]:
    """One line naming what is wrong with one file, or None when it matches."""
    path = os.path.join(tag_dir, name)
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path}: missing (the manifest lists it, {want['size']} bytes)"
    if size != want["size"]:
        what = "truncated" if size < want["size"] else "longer than written"
        return f"{path}: {what}: {size} bytes, the manifest says {want['size']}"
    try:
        got = file_entry(path, chunk)["crc32"]
    except OSError as e:
        return f"{path}: unreadable ({e.strerror or e})"
    for i, (a, b) in enumerate(zip(got, want["crc32"], strict=True)):
        if a != b:
            lo, hi = i * chunk, min((i + 1) * chunk, size)
            return (f"{path}: checksum mismatch in bytes {lo}-{hi - 1} (crc32 {a}, the manifest "
                    f"says {b}): the file was altered after it was written")
    return None


def problems(tag_dir: str, names: Optional[Iterable[str]] = None) -> list[str]:
    """Every mismatch between `tag_dir`'s manifested files and its manifest (restricted to
    `names`, a share of the files, when given); [] when they match or it has no manifest. Files
    the manifest does not list (`unlisted`) are not damage: loading never reads them."""
    doc = read(tag_dir)
    if doc is None:
        return []
    files, chunk = doc["files"], int(doc.get("chunk_bytes", CHUNK))
    out = []
    check = sorted(files) if names is None else [n for n in names if n in files]
    for name in check:
        bad = check_file(tag_dir, name, files[name], chunk)
        if bad:
            out.append(bad)
    return out


def unlisted(tag_dir: str, doc: dict) -> list[str]:
    """Files of `tag_dir` its manifest does not list (added after the save)."""
    extra = sorted(set(listed_files(tag_dir)) - set(doc["files"]))
    return [f"{os.path.join(tag_dir, name)}: not in the manifest (added after the save)"
            for name in extra]


def verify(tag_dir: str) -> bool:
    """Raise CheckpointFormatError naming the first problem; True when verified, False when
    the directory has no manifest."""
    bad = problems(tag_dir)
    if bad:
        more = f" (and {len(bad) - 1} more problems)" if len(bad) > 1 else ""
        raise CheckpointFormatError(bad[0] + more)
    return read(tag_dir) is not None
