"""Runs every bad-input case in ONE process (start-up costs seconds) and prints a JSON report.

Each case builds its bad input under a work directory, runs a real entry point in-process
(`pretrain_gpt.py`'s main through `run_main`, or tools' `main`) and records the exit code, the
stderr text, and whether pre-existing outputs were left byte-identical.

    python -m tests.bad_inputs.runner WORKDIR > report.json
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--num-experts", "4", "--micro-batch-size", "2",
        "--train-iters", "2", "--eval-iters", "1", "--eval-interval", "100", "--log-interval",
        "1"]
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127"]


def _tool(name: str):
    """tools/<name>.py as a module (loaded once; "checkpoint/verify" names a subfolder's)."""
    key = "tool_" + name.replace("/", "_")
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _tool_main(name: str):
    """tools/<name>.py's main, loaded on first call."""
    return lambda argv: _tool(name).main(argv)


def _pretrain(argv):
    import pretrain_gpt
    from megatron_selfroute.training.loop import run_main

    run_main(pretrain_gpt.main, argv)


def _pretrain_vit(argv):
    import pretrain_vit
    from megatron_selfroute.training.loop import run_main

    run_main(pretrain_vit.main, argv)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def run(fn, argv, guard: Path | None = None) -> dict:
    """Call fn(argv); return exit code, stderr and whether `guard` stayed byte-identical."""
    before = _digest(guard) if guard is not None else None
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            fn(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # an unhandled error is a defect: report it with its type
            code, err = -1, io.StringIO(f"UNHANDLED {type(e).__name__}: {e}")
    out = {"rc": code, "stderr": err.getvalue()}
    if guard is not None:
        out["guard_intact"] = _digest(guard) == before
    return out


def write_tokens(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> str:
    from megatron_selfroute.data.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype)
    for d in docs:
        b.add_document(np.array(d, dtype=dtype))
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


def build_cases(work: Path) -> dict:
    """name -> (callable, argv, guard dir or None)."""
    rng = np.random.default_rng(0)
    good = write_tokens(work / "good", [list(rng.integers(0, 120, 200)) for _ in range(30)])
    data = ["--data-path", good, "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
            "--split", "90,10,0"]
    ckpt = work / "ckpt"
    run(_pretrain, TINY + MOCK + ["--save", str(ckpt), "--router-type", "self"])
    tag = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()

    def ck_copy(name, mutate, manifest=True):
        """A copy of the checkpoint, mutated; manifest=False drops its manifest first (as in a
        checkpoint written before manifests, or one whose manifest was rewritten to match), so
        the deeper checks behind verification are what is tested."""
        dst = work / name
        shutil.copytree(ckpt, dst)
        if not manifest:
            (dst / tag / "manifest.json").unlink()
        mutate(dst / tag)
        return dst

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {work / 'PWNED'}",))

    def evil(d):
        import torch

        torch.save({"module": Evil()}, d / "mp_rank_00_model_states.pt")

    missing_expert = ck_copy("ck_missing_expert", lambda d: (
        d / "layer_0_expert_1_mp_rank_00_model_states.pt").unlink())
    corrupt = ck_copy("ck_corrupt", lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(
        b"\x00garbage" * 10), manifest=False)
    malicious = ck_copy("ck_malicious", evil, manifest=False)

    def layout(d):
        state = json.loads((d / "run_state.json").read_text())
        state["config"]["parallel"]["expert_model_parallel_size"] = 2
        (d / "run_state.json").write_text(json.dumps(state))

    wrong_layout = ck_copy("ck_layout", layout, manifest=False)

    def flip(d):
        f = d / "layer_1_expert_2_mp_rank_00_model_states.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))

    flipped = ck_copy("ck_flipped", flip)
    short = ck_copy("ck_short", lambda d: os.truncate(d / "mp_rank_00_model_states.pt", 1000))
    leased = ck_copy("ck_leased", lambda d: (d.parent / "save_lease.json").write_text(json.dumps(
        {"host": "gpu-node-042", "pid": 31337, "job_id": "SLURM_JOB_ID=4242",
         "started": __import__("time").time() - 60, "heartbeat": __import__("time").time(),
         "token": "someone-else"})))
    no_state = ck_copy("ck_not_ckpt", lambda d: (d / "run_state.json").unlink(), manifest=False)
    dangling = work / "ck_dangling"
    dangling.mkdir()
    (dangling / "latest_checkpointed_iteration.txt").write_text("iter_0000099\n")

    trunc = write_tokens(work / "trunc", [list(range(100))] * 5)
    with open(trunc + ".bin", "r+b") as f:
        f.truncate(300)
    badidx = write_tokens(work / "badidx", [list(range(100))] * 5)
    Path(badidx + ".idx").write_bytes(b"NOTMMIDX" + Path(badidx + ".idx").read_bytes()[8:])
    empty = write_tokens(work / "empty", [])
    big_ids = write_tokens(work / "bigids", [list(range(900, 1000))] * 20)
    few = write_tokens(work / "few", [list(range(20))] * 3)

    (work / "bad.json").write_text('{"train_micro_batch_size_per_gpu": 2,\n  oops }')
    (work / "conflict.json").write_text('{"train_micro_batch_size_per_gpu": 8}')
    (work / "sched.json").write_text('{"scheduler": {"type": "WarmupLR"}}')
    (work / "sgd.json").write_text('{"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}')
    (work / "notdir").write_text("a file, not a directory")
    (work / "merges.json").write_text('{"not": "merges"}')
    (work / "garbage.model").write_bytes(b"\x00\x01not a sentencepiece model")
    (work / "docs.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (work / "nokey.jsonl").write_text('{"body": "no text key"}\n')
    pre_out = work / "pre_out"
    pre_out.mkdir()
    (pre_out / "keep_text_document.bin").write_bytes(b"existing output")

    from tests.vision.conftest import make_image_folder

    images = make_image_folder(work / "images", per_class=3, val_per_class=1)
    broken = images / "train" / "class1" / "img01.png"
    broken.write_bytes(b"not a png")
    vit_out = work / "vit_out"
    vit_out.mkdir()
    (vit_out / "notes.txt").write_text("an existing output\n")

    convert = _tool_main("checkpoint/convert")
    run(convert, ["--input", str(ckpt), "--output", str(work / "consolidated"), "--to",
                  "consolidated"])
    run(convert, ["--input", str(ckpt), "--output", str(work / "ds_converted"), "--to",
                  "deepspeed"])
    pretrain, pre = _pretrain, _tool("preprocess_data").main
    t, m = TINY, MOCK
    guard = ckpt
    save = ["--save", str(ckpt)]
    cases = {
        # flags: conflicting, out of range, missing
        "ep_not_divisor": (pretrain, t + m + ["--expert-model-parallel-size", "3"] + save, guard),
        "topk_range": (pretrain, t + m + ["--moe-router-topk", "5"] + save, guard),
        "bf16_fp16": (pretrain, t + m + ["--bf16", "--fp16"] + save, guard),
        "fp16_on_cpu": (pretrain, t + m + ["--fp16"] + save, guard),
        "iters_and_samples": (pretrain, t + m + ["--train-samples", "8"] + save, guard),
        "dropout_range": (pretrain, t + m + ["--hidden-dropout", "1.5"] + save, guard),
        "alias_conflict": (pretrain, t + m + ["--moe-router-topk", "2", "--topk", "3"] + save,
                           guard),
        "zero3": (pretrain, t + m + ["--zero-stage", "3"] + save, guard),
        "global_batch": (pretrain, t + m + ["--global-batch-size", "3"] + save, guard),
        "top1_no_presoftmax": (pretrain, t + m + ["--moe-router-topk", "1"] + save, guard),
        "self_dims_overflow": (pretrain, t + m + ["--num-experts", "64"] + save, guard),
        "no_data": (pretrain, t + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "127"]
                    + save, guard),
        "train_iters_zero": (pretrain, t + m + ["--train-iters", "0"] + save, guard),
        "lr_nan": (pretrain, t + m + ["--lr", "nan"] + save, guard),
        "lr_negative": (pretrain, t + m + ["--lr=-1e-3"] + save, guard),
        "adam_beta_one": (pretrain, t + m + ["--adam-beta2", "1.0"] + save, guard),
        "keep_last_zero": (pretrain, t + m + ["--keep-last", "0"] + save, guard),
        "lease_timeout_negative": (pretrain, t + m + ["--save-lease-timeout", "-5"] + save,
                                   guard),
        "log_interval_zero": (pretrain, t + m + ["--log-interval", "0"] + save, guard),
        "eval_iters_negative": (pretrain, t + m + ["--eval-iters=-1"] + save, guard),
        "heads_zero": (pretrain, t + m + ["--num-attention-heads", "0"] + save, guard),
        "ffn_zero": (pretrain, t + m + ["--ffn-hidden-size", "0"] + save, guard),
        "experts_zero": (pretrain, t + m + ["--num-experts", "0"] + save, guard),
        "split_four_parts": (pretrain, t + data + ["--split", "90,5,3,2"] + save, guard),
        "aux_coeff_nan": (pretrain, t + m + ["--moe-aux-loss-coeff", "nan"] + save, guard),
        "layernorm_eps_nan": (pretrain, t + m + ["--layernorm-epsilon", "nan"] + save, guard),
        "save_holds_another_run": (pretrain, t + m + save, guard),
        "load_tag_dir": (pretrain, t + m + ["--load", str(ckpt / tag)] + save, guard),
        "load_consolidated": (pretrain, t + m + ["--load", str(work / "consolidated")] + save,
                              guard),
        "load_a_file": (pretrain, t + m + ["--load", good + ".bin"] + save, guard),
        "load_converted_with_optim": (pretrain, t + m + ["--load", str(work / "ds_converted")]
                                      + save, guard),
        "run_summary_unwritable": (pretrain, t + m + ["--run-summary",
                                                      str(work / "notdir" / "s.json")], None),
        # data
        "missing_prefix": (pretrain, t + ["--data-path", str(work / "nope")] + data[2:] + save,
                           guard),
        "truncated_bin": (pretrain, t + ["--data-path", trunc] + data[2:] + save, guard),
        "corrupt_idx": (pretrain, t + ["--data-path", badidx] + data[2:] + save, guard),
        "empty_dataset": (pretrain, t + ["--data-path", empty] + data[2:] + save, guard),
        "ids_beyond_vocab": (pretrain, t + ["--data-path", big_ids] + data[2:] + [
            "--save", str(work / "ids_out")], guard),
        "split_too_small": (pretrain, t + ["--data-path", few, "--tokenizer-type",
                                           "NullTokenizer", "--vocab-size", "127", "--split",
                                           "1,0,99"] + save, guard),
        # checkpoints
        "router_mismatch": (pretrain, t + m + ["--load", str(ckpt), "--router-type", "learned"]
                            + save, guard),
        "shape_mismatch": (pretrain, t[:2] + ["--hidden-size", "64"] + t[4:] + m +
                           ["--load", str(ckpt)] + save, guard),
        "missing_expert_file": (pretrain, t + m + ["--load", str(missing_expert)] + save, guard),
        "corrupt_checkpoint": (pretrain, t + m + ["--load", str(corrupt)] + save, guard),
        "malicious_pickle": (pretrain, t + m + ["--load", str(malicious)] + save, guard),
        "layout_mismatch": (pretrain, t + m + ["--load", str(wrong_layout)] + save, guard),
        "not_a_checkpoint": (pretrain, t + m + ["--load", str(no_state)] + save, guard),
        "dangling_pointer": (pretrain, t + m + ["--load", str(dangling)] + save, guard),
        "flipped_byte": (pretrain, t + m + ["--load", str(flipped)] + save, guard),
        "truncated_checkpoint": (pretrain, t + m + ["--load", str(short)] + save, guard),
        "save_dir_leased": (pretrain, t + m + ["--save", str(leased)], leased),
        "verify_not_a_checkpoint": (_tool_main("checkpoint/verify"), [str(work / "notdir")],
                                    None),
        "convert_flipped_byte": (_tool_main("checkpoint/convert"), [
            "--input", str(flipped), "--output", str(work / "conv_out"), "--to",
            "consolidated"], flipped),
        "analyze_missing_data": (_tool_main("analyze_routing"), [
            "--load", str(ckpt), "--data-path", str(work / "no_such_prefix"), "--output-dir",
            str(work / "routing_out"), "--tokens", "64"], guard),
        # tokenizer files
        "vocab_file_missing": (pretrain, t + data[:2] + ["--vocab-file", str(work / "nope.json"),
                                                         "--merge-file", str(work / "m")] + save,
                               guard),
        "merges_wrong_format": (pretrain, t + data[:2] + [
            "--vocab-file", str(REPO / "megatron_selfroute/assets/gpt2/encoder.json"),
            "--merge-file", str(work / "merges.json")] + save, guard),
        "sentencepiece_garbage": (pretrain, t + data[:2] + [
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            str(work / "garbage.model")] + save, guard),
        # DeepSpeed JSON
        "ds_json_malformed": (pretrain, t + m + ["--deepspeed-config", str(work / "bad.json")]
                              + save, guard),
        "ds_json_conflict": (pretrain, t + m + ["--deepspeed_config", str(work / "conflict.json")]
                             + save, guard),
        "ds_json_scheduler": (pretrain, t + m + ["--deepspeed-config", str(work / "sched.json")]
                              + save, guard),
        "ds_json_optimizer": (pretrain, t + m + ["--deepspeed-config", str(work / "sgd.json")]
                              + save, guard),
        "ds_json_missing": (pretrain, t + m + ["--deepspeed-config", str(work / "none.json")]
                            + save, guard),
        # outputs
        "save_unwritable": (pretrain, t + m + ["--save", str(work / "notdir" / "ck")], None),
        "tensorboard_unwritable": (pretrain, t + m + ["--tensorboard-dir",
                                                      str(work / "notdir" / "tb")] + save, guard),
        # images
        "image_unreadable": (_pretrain_vit, [
            "--data-path", str(images), "--img-size", "32", "--patch-size", "8", "--num-layers",
            "1", "--hidden-size", "16", "--num-attention-heads", "2", "--batch-size", "12",
            "--epochs", "1", "--num-workers", "0", "--no-repeated-aug", "--save",
            str(vit_out)], vit_out),
        "vit_batch_zero": (_pretrain_vit, ["--data-path", str(images), "--batch-size", "0"],
                           None),
        "vit_img_zero": (_pretrain_vit, ["--data-path", str(images), "--img-size", "0"], None),
        "vit_epochs_zero": (_pretrain_vit, ["--data-path", str(images), "--epochs", "0"], None),
        # tools
        "generate_temperature_nan": (_tool_main("generate"), [
            "--load", str(ckpt), "--prompt", "1 2", "--temperature", "nan"], guard),
        "eval_output_is_dir": (_tool_main("eval_lm"), [
            "--load", str(ckpt), "--output", str(work)], guard),
        "analyze_bad_device": (_tool_main("analyze_routing"), [
            "--load", str(ckpt), "--data-path", good, "--output-dir", str(work / "ar_out"),
            "--device", "bogus"], guard),
        "convert_world_size_zero": (convert, [
            "--input", str(ckpt), "--output", str(work / "ws0"), "--to", "deepspeed",
            "--world-size", "0"], guard),
        # preprocessing
        "preprocess_log_interval_zero": (pre, ["--input", str(work / "nokey.jsonl"),
                                               "--output-prefix", str(pre_out / "keep"),
                                               "--tokenizer-type", "GPT2BPETokenizer",
                                               "--log-interval", "0"], pre_out),
        "preprocess_bad_json": (pre, ["--input", str(work / "docs.jsonl"), "--output-prefix",
                                      str(pre_out / "keep"), "--tokenizer-type",
                                      "GPT2BPETokenizer"], pre_out),
        "preprocess_missing_key": (pre, ["--input", str(work / "nokey.jsonl"), "--output-prefix",
                                         str(pre_out / "keep"), "--tokenizer-type",
                                         "GPT2BPETokenizer"], pre_out),
        "preprocess_missing_input": (pre, ["--input", str(work / "absent.jsonl"),
                                           "--output-prefix", str(pre_out / "keep"),
                                           "--tokenizer-type", "GPT2BPETokenizer"], pre_out),
    }
    return cases


def main(work: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    cases = build_cases(work_dir)
    report = {name: run(fn, argv, guard) for name, (fn, argv, guard) in cases.items()}
    report["_pwned"] = {"rc": 0, "stderr": str((work_dir / "PWNED").exists())}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
