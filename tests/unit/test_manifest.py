"""Checkpoint manifests (checkpoint/manifest.py), the --load verification and fallback
(training/checkpointing.choose_verified) and tools/checkpoint/verify.py, on hand-made
directories (a real training checkpoint is covered by tests/bad_inputs and test_save_faults)."""
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_selfroute.checkpoint import CheckpointError, CheckpointFormatError, manifest
from megatron_selfroute.training.checkpointing import choose_verified

REPO = Path(__file__).resolve().parents[2]
ONE = SimpleNamespace(rank=0, world_size=1)  # the layout fields verification reads


def make_tag(d: Path, sizes=(100, 20 << 20)) -> Path:
    d.mkdir(parents=True)
    for i, n in enumerate(sizes):
        (d / f"f{i}.pt").write_bytes(os.urandom(n))
    manifest.write(str(d), manifest.entries(str(d), manifest.listed_files(str(d))))
    return d


def test_manifest_records_sizes_and_chunk_crcs(tmp_path):
    d = make_tag(tmp_path / "t")
    doc = json.loads((d / manifest.MANIFEST).read_text())
    big = (d / "f1.pt").read_bytes()
    want = [f"{zlib.crc32(big[i:i + manifest.CHUNK]):08x}"
            for i in range(0, len(big), manifest.CHUNK)]
    assert doc["files"]["f1.pt"] == {"size": 20 << 20, "crc32": want} and len(want) == 2
    assert manifest.problems(str(d)) == [] and manifest.verify(str(d)) is True


def test_flipped_byte_is_named_with_its_chunk(tmp_path):
    d = make_tag(tmp_path / "t")
    with open(d / "f1.pt", "r+b") as f:  # a byte in the second 16 MiB chunk
        f.seek(17 << 20)
        b = f.read(1)
        f.seek(17 << 20)
        f.write(bytes([b[0] ^ 0x10]))
    (bad,) = manifest.problems(str(d))
    assert bad.startswith(f"{d}/f1.pt: checksum mismatch in bytes 16777216-20971519")
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        manifest.verify(str(d))


def test_truncated_missing_and_extra_files(tmp_path):
    d = make_tag(tmp_path / "t", sizes=(100, 200, 300))
    os.truncate(d / "f0.pt", 40)
    (d / "f1.pt").unlink()
    (d / "stray.pt").write_bytes(b"x")
    assert manifest.problems(str(d)) == [
        f"{d}/f0.pt: truncated: 40 bytes, the manifest says 100",
        f"{d}/f1.pt: missing (the manifest lists it, 200 bytes)"]
    # a file the manifest does not list is noted, not damage (loading never reads it)
    assert manifest.unlisted(str(d), manifest.read(str(d))) == [
        f"{d}/stray.pt: not in the manifest (added after the save)"]


def test_no_manifest_is_unverified_not_an_error(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "f.pt").write_bytes(b"abc")
    assert manifest.problems(str(d)) == [] and manifest.verify(str(d)) is False


def test_load_fallback_picks_the_newest_checkpoint_that_verifies(tmp_path):
    for it in (2, 4, 6):
        make_tag(tmp_path / f"iter_{it:07d}", sizes=(64,))
    for it in (4, 6):
        os.truncate(tmp_path / f"iter_{it:07d}" / "f0.pt", 10)
    with pytest.raises(CheckpointError, match="iter_0000006/f0.pt: truncated.*--load-fallback"):
        choose_verified(str(tmp_path), "iter_0000006", ONE, fallback=False)
    assert choose_verified(str(tmp_path), "iter_0000006", ONE, fallback=True) == "iter_0000002"
    os.truncate(tmp_path / "iter_0000002" / "f0.pt", 10)
    with pytest.raises(CheckpointError, match="found no earlier checkpoint .* that verifies"):
        choose_verified(str(tmp_path), "iter_0000006", ONE, fallback=True)


def verify_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools/checkpoint/verify.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_verify_tool_reports_each_checkpoint(tmp_path):
    src = REPO / "tests/assets/ckpt_pre_layout/gpt_ep2_zero2_learned"
    save = tmp_path / "save"
    shutil.copytree(src, save)
    old = save / "iter_0000002"
    r = verify_cli(str(save))
    assert r.returncode == 0 and r.stdout.startswith(f"UNVERIFIED {old}  <- pointer"), r.stdout
    # give it a manifest, then damage one expert file: DAMAGED, exit 1, the file named
    manifest.write(str(old), manifest.entries(str(old), manifest.listed_files(str(old))))
    assert verify_cli(str(old)).stdout.startswith(f"OK         {old}")
    expert = old / "layer_0_expert_1_mp_rank_00_model_states.pt"
    expert.unlink()
    r = verify_cli(str(save), "--json", str(tmp_path / "r.json"))
    assert r.returncode == 1 and r.stdout.startswith(f"DAMAGED    {old}  <- pointer: {expert}: "
                                                     "missing"), r.stdout
    assert json.loads((tmp_path / "r.json").read_text())[str(old)]["status"] == "DAMAGED"
    r = verify_cli(str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nothing'}: not a " \
                                                     "directory"


def test_keep_last_prunes_only_older_checkpoints(tmp_path):
    """--keep-last deletes checkpoints older than the new one, never the new one nor newer
    ones (a run resumed by --load-fallback from iter 2 past a damaged iter 6 saves iter 4)."""
    from megatron_selfroute.training.checkpointing import prune

    for it in (1, 2, 4, 6):
        (tmp_path / f"iter_{it:07d}").mkdir()
    assert prune(str(tmp_path), 2, "iter_0000004") == ["iter_0000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000004",
                                                          "iter_0000006"]


def test_a_save_killed_before_its_first_pointer_update_resumes(tmp_path):
    """rename done, pointer not yet written: the complete checkpoint (it has a manifest) is
    resumed; a directory of manifest-less tags without a pointer is still an error."""
    from megatron_selfroute.training.checkpointing import _interrupted_first_save

    make_tag(tmp_path / "iter_0000003", sizes=(8,))
    (tmp_path / "iter_0000005").mkdir()  # no manifest: not complete
    assert _interrupted_first_save(str(tmp_path)) == "iter_0000003"
    assert _interrupted_first_save(str(tmp_path / "iter_0000005")) is None


def test_dense_zero0_checkpoint_resumes(tmp_path):
    """A dense model under ZeRO-0 keeps its optimizer state inside mp_rank_00_model_states.pt
    (no *optim_states.pt file): it resumes, and verify.py calls it OK."""
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--eval-iters", "1",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
            "--zero-stage", "0", "--save", str(tmp_path / "ck"), "--load", str(tmp_path / "ck")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for iters in ("2", "3"):
        r = subprocess.run([sys.executable, "pretrain_gpt.py", *args, "--train-iters", iters],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at iteration 2" in r.stdout
    v = verify_cli(str(tmp_path / "ck"))
    assert v.returncode == 0 and v.stdout.count("OK ") == 2, v.stdout
