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


def test_vit_tp2_checkpoint_moves_to_one_process_and_back_with_its_optimizer(tmp_path,
                                                                               image_root):
    """A DeiT MoE saved at TP = 2 (with its EMA buffers, sharded like their weights) converts
    with its optimizer to TP = 1, where the resumed step equals the unconverted run's, and back
    to TP = 2 with every weight and EMA buffer bit for bit."""
    import torch
    from safetensors.torch import load_file

    from tests.distributed.harness import run_argv_cases
    from tests.golden.runs import VIT_TINY
    from tests.integration.helpers import run_tool

    argv = ["vit", *VIT_TINY, "--data-path", str(image_root), "--batch-size", "4",
            "--global-batch-size", "8", "--num-experts", "4", "--router-type", "learned",
            "--drop-path", "0", "--model-ema", "--model-ema-decay", "0.9"]
    tp2 = argv + ["--tensor-model-parallel-size", "2"]
    ck = tmp_path / "ck"
    straight, _ = run_argv_cases(tmp_path / "tp2", 2, "tests.golden.cases", "MSR_GOLDEN_ARGV", [
        tp2, tp2 + ["--save", str(ck), "--save-interval", "2", "--exit-interval", "2"]])

    def convert(src, out, *flags):
        run_tool("checkpoint/convert.py", "--input", str(src), "--output", str(out), *flags)

    convert(ck, tmp_path / "one", "--to", "deepspeed", "--optimizer-state")
    convert(tmp_path / "one", tmp_path / "back", "--to", "deepspeed", "--optimizer-state",
            "--tensor-model-parallel-size", "2")
    (one,) = run_argv_cases(tmp_path / "resume", 1, "tests.golden.cases", "MSR_GOLDEN_ARGV",
                            [argv + ["--load", str(tmp_path / "one")]])
    assert sorted(one["losses"]) == ["3"], one
    assert math.isclose(one["losses"]["3"], straight["losses"]["3"], rel_tol=1e-5), (
        one, straight)
    for src in (ck, tmp_path / "back"):
        convert(src, tmp_path / f"{src.name}_c", "--to", "consolidated")
    a = load_file(str(tmp_path / "ck_c" / "model.safetensors"))
    b = load_file(str(tmp_path / "back_c" / "model.safetensors"))
    assert set(a) == set(b) and any(".ema_" in k for k in a), sorted(a)[:5]
    for k in a:
        assert torch.equal(a[k], b[k]), k
