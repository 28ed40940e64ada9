"""ViT under tensor parallelism (issue 20, part 6)."""
import math


def test_vit_tp2_trains_like_one_process(tmp_path, image_root):
    """pretrain_vit.py gets TP through the shared blocks: a DeiT MoE (self router) at TP = 2
    gives the one-process run's losses (drop path off: its masks are drawn per head slice)."""
    from tests.distributed.harness import run_argv_cases
    from tests.golden.runs import VIT_TINY

    argv = ["vit", *VIT_TINY, "--data-path", str(image_root), "--batch-size", "4",
            "--global-batch-size", "8", "--num-experts", "4", "--router-type", "self",
            "--drop-path", "0"]
    one = run_argv_cases(tmp_path / "one", 1, "tests.golden.cases", "MSR_GOLDEN_ARGV", [argv])
    two = run_argv_cases(tmp_path / "tp2", 2, "tests.golden.cases", "MSR_GOLDEN_ARGV",
                         [argv + ["--tensor-model-parallel-size", "2"]])
    assert set(one[0]["losses"]) == set(two[0]["losses"]) == {"1", "2", "3"}
    for it, loss in one[0]["losses"].items():
        assert math.isclose(two[0]["losses"][it], loss, rel_tol=1e-5), (one, two)
