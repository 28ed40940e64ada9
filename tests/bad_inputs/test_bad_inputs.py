"""Every bad input is one clear error: a one-line message naming the culprit, a non-zero exit, no
traceback, and no existing output overwritten. All cases run in one spawned process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

NEEDLES = {
    "ep_not_divisor": "--num-experts 4 is not divisible by --expert-model-parallel-size 3",
    "topk_range": "--moe-router-topk 5 must be between 1 and --num-experts 4",
    "bf16_fp16": "--bf16 and --fp16 are mutually exclusive",
    "fp16_on_cpu": "--fp16 needs a GPU",
    "iters_and_samples": "--train-iters and --train-samples are mutually exclusive",
    "dropout_range": "--hidden-dropout must be in [0, 1)",
    "alias_conflict": "--topk 3 conflicts with --moe-router-topk 2",
    "zero3": "--zero-stage 3",
    "global_batch": "--global-batch-size 3 is not divisible",
    "top1_no_presoftmax": "--moe-router-pre-softmax",
    "self_dims_overflow": "--num-experts 64 <= --hidden-size 32",
    "no_data": "--data-path is required",
    "train_iters_zero": "--train-iters must be >= 1, got 0",
    "lr_nan": "--lr must be a finite number >= 0, got nan",
    "lr_negative": "--lr must be a finite number >= 0, got -0.001",
    "adam_beta_one": "--adam-beta2 must be in [0, 1), got 1.0",
    "keep_last_zero": "--keep-last must be >= 1, got 0",
    "lease_timeout_negative": "--save-lease-timeout must be a finite number >= 0, got -5.0",
    "log_interval_zero": "--log-interval must be >= 1, got 0",
    "flipped_byte": "layer_1_expert_2_mp_rank_00_model_states.pt: checksum mismatch in bytes",
    "truncated_checkpoint": "mp_rank_00_model_states.pt: truncated: 1000 bytes, the manifest says",
    "save_dir_leased": "is in use by another run (host gpu-node-042 pid 31337, job "
                       "SLURM_JOB_ID=4242",
    "verify_not_a_checkpoint": "notdir: not a directory",
    "convert_flipped_byte": "layer_1_expert_2_mp_rank_00_model_states.pt: checksum mismatch",
    "analyze_missing_data": "--data-path",
    "eval_iters_negative": "--eval-iters must be >= 0, got -1",
    "heads_zero": "--num-attention-heads must be >= 1, got 0",
    "ffn_zero": "--ffn-hidden-size must be >= 1, got 0",
    "experts_zero": "--num-experts must be >= 1, got 0 (omit --num-experts for a dense model)",
    "split_four_parts": "--split 90,5,3,2: at most three weights",
    "aux_coeff_nan": "--moe-aux-loss-coeff must be a finite number >= 0, got nan",
    "layernorm_eps_nan": "--layernorm-epsilon must be a finite number > 0, got nan",
    "save_holds_another_run": "already holds checkpoints of a run (its pointer names "
                              "iter_0000002); resume it with --load",
    "load_tag_dir": "is one checkpoint (tag) directory; pass its parent",
    "load_consolidated": "is a consolidated or Hugging Face checkpoint; convert it",
    "load_a_file": "good.bin is a file; pass the --save directory",
    "load_converted_with_optim": "has no optimizer states (a converted checkpoint holds weights "
                                 "only); add --no-load-optim",
    "run_summary_unwritable": "--run-summary's directory",
    "vit_batch_zero": "--batch-size must be >= 1, got 0",
    "vit_img_zero": "--img-size must be >= 1, got 0",
    "vit_epochs_zero": "--epochs must be >= 1, got 0",
    "generate_temperature_nan": "--temperature must be a finite number >= 0, got nan",
    "eval_output_is_dir": "is a directory (give a file name)",
    "analyze_bad_device": "--device bogus: not a device",
    "convert_world_size_zero": "--world-size must be >= 1, got 0",
    "preprocess_log_interval_zero": "--log-interval must be >= 1",
    "missing_prefix": "nope.idx",
    "truncated_bin": "trunc.bin: truncated",
    "corrupt_idx": "badidx.idx: not an MMIDIDX index file",
    "empty_dataset": "empty: empty dataset",
    "ids_beyond_vocab": "token id 999 >= vocabulary size 127",
    "split_too_small": "--split 1,0,99 leaves no training data",
    "router_mismatch": "trained with --router-type self, this run has --router-type learned",
    "shape_mismatch": "trained with --hidden-size 32, this run has --hidden-size 64",
    "missing_expert_file": "layer_0_expert_1_mp_rank_00_model_states.pt",
    "corrupt_checkpoint": "mp_rank_00_model_states.pt: refused to load",
    "malicious_pickle": "refused to load (weights_only=True rejected it",
    "layout_mismatch": "--expert-model-parallel-size 2, this run 1",
    "not_a_checkpoint": "run_state.json: not a checkpoint",
    "dangling_pointer": "names 'iter_0000099', which is not a checkpoint directory",
    "vocab_file_missing": "nope.json",
    "merges_wrong_format": "merges.json",
    "sentencepiece_garbage": "garbage.model: not a SentencePiece model",
    "ds_json_malformed": "bad.json: invalid JSON at line 2",
    "ds_json_conflict": "train_micro_batch_size_per_gpu = 8 conflicts with --micro-batch-size 2",
    "ds_json_scheduler": "'scheduler' is not supported",
    "ds_json_optimizer": "optimizer type 'SGD' is not supported",
    "ds_json_missing": "none.json: file not found",
    "save_unwritable": "--save",
    "tensorboard_unwritable": "--tensorboard-dir",
    "image_unreadable": "cannot read image",
    "preprocess_bad_json": "docs.jsonl:2: invalid JSON",
    "preprocess_missing_key": "nokey.jsonl:1: missing key 'text'",
    "preprocess_missing_input": "absent.jsonl",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad_inputs")
    r = subprocess.run([sys.executable, "-m", "tests.bad_inputs.runner", str(work)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_at_least_thirty_cases(report):
    assert len(NEEDLES) >= 30
    assert set(NEEDLES) <= set(report)


@pytest.mark.parametrize("case", sorted(NEEDLES))
def test_one_clear_line(report, case):
    res = report[case]
    assert res["rc"] not in (0, -1), res
    err_lines = [ln for ln in res["stderr"].splitlines() if "error:" in ln]
    assert len(err_lines) == 1, res["stderr"]
    assert NEEDLES[case] in err_lines[0], err_lines[0]
    assert "Traceback" not in res["stderr"]
    assert res.get("guard_intact", True), "an existing output was modified"


def test_analyze_routing_fails_before_its_progress_bar(report):
    err = report["analyze_missing_data"]["stderr"]
    assert "no token dataset" in err and "%|" not in err and "routing:" not in err, err


def test_malicious_payload_never_ran(report):
    assert report["_pwned"]["stderr"] == "False"
