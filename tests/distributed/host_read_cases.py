"""Host reads per training step, counted inside harness processes (issue 19, part 5).

A `TorchFunctionMode` sees every `.item()`, `.tolist()`, `.cpu()`, `.numpy()` and every
`bool()`/`float()`/`int()` of a tensor: on a GPU each of them waits for the device. Each read is
filed by where it happened: inside `Trainer.micro_batch` (the micro-batch's forward and
backward), in the host-side batch checks of `_to_device` (the loader's CPU tensors before the
copy to the device: no device wait), or elsewhere in the step (once per step, e.g. the NaN
verdict and the ZeRO-0 gradient norm), with the first project or DeepSpeed frame as its site.
"""
from __future__ import annotations

import os
import sys

from torch.overrides import TorchFunctionMode

from tests.distributed.train_cases import MOCK, TINY

DENSE = [a for i, a in enumerate(TINY) if "--num-experts" not in TINY[max(i - 1, 0):i + 1]]
MOE = ["--num-experts", "4"]
READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class HostReads(TorchFunctionMode):
    def __init__(self, micro_code, host_code) -> None:
        super().__init__()
        self.micro_code, self.host_code = micro_code, host_code
        self.micro: list[str] = []
        self.step: list[str] = []
        self.host_batch = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            self._file(func.__name__)
        return func(*args, **(kwargs or {}))

    def _file(self, name: str) -> None:
        frame, codes, site = sys._getframe(2), set(), None
        while frame is not None:
            codes.add(frame.f_code)
            path = frame.f_code.co_filename
            if site is None and ("megatron_selfroute" in path or "deepspeed" in path):
                site = f"{os.path.basename(path)}:{frame.f_code.co_name}:{name}"
            frame = frame.f_back
        if self.host_code in codes:
            self.host_batch += 1
        elif self.micro_code in codes:
            self.micro.append(site)
        else:
            self.step.append(site)


def count(argv: list[str]) -> dict:
    """Two warm-up steps, then the reads of one full step (micro-batches, NaN verdict, clip,
    optimizer, record and log)."""
    import pretrain_gpt
    from megatron_selfroute.arguments import parse_args
    from megatron_selfroute.parallel.layout import ParallelLayout
    from megatron_selfroute.training import loop

    cfg, _ = parse_args(DENSE + MOCK + ["--train-iters", "10", "--log-interval", "1000",
                                       "--eval-iters", "0"] + argv)
    trainer = loop.Trainer.setup(cfg, pretrain_gpt.make_task(cfg), ParallelLayout.from_config(cfg))
    try:
        for _ in range(2):
            trainer.record(trainer.train_step())
        mode = HostReads(loop.Trainer.micro_batch.__code__, loop._to_device.__code__)
        with mode:
            step = trainer.train_step()
            trainer.record(step)
            trainer.log(step)
        return {"micro": mode.micro, "step": sorted(mode.step), "host_batch": mode.host_batch,
                "accum": trainer.accum}
    finally:
        trainer.close()


GROUPED = ["--moe-grouped-gemm", "grouped"]  # the counts stay on the device (CPU: fp32 too)
CONFIGS_1 = {
    "dense": [],
    "learned_bias_z": MOE + ["--router-type", "learned", "--moe-router-enable-expert-bias",
                       "--moe-aux-loss-coeff", "0", "--moe-z-loss-coeff", "1e-3"] + GROUPED,
    "self_aux": [*MOE, "--router-type", "self", "--moe-aux-loss-coeff", "1e-2"] + GROUPED,
    "hash": [*MOE, "--router-type", "hash"] + GROUPED,
    "learned_loop": [*MOE, "--router-type", "learned", "--moe-grouped-gemm", "loop"],
}
CONFIGS_2 = {
    "ep2_learned": [*MOE, "--router-type", "learned", "--expert-model-parallel-size", "2",
                    *GROUPED],
    "zero2_self": [*MOE, "--router-type", "self", "--zero-stage", "2"] + GROUPED,
}


def _cases(configs: dict, world: int) -> dict:
    out = {}
    for name, argv in configs.items():
        for accum in (1, 4):
            gbs = str(2 * world * accum)
            out[f"{name}/{accum}"] = (lambda a=argv, g=gbs: count(
                a + ["--micro-batch-size", "2", "--global-batch-size", g]))
    return out


CASES = {**_cases(CONFIGS_1, 1), **_cases(CONFIGS_2, 2)}
