"""The multi-node scripts really train a tiny MoE job (EP=2 over two "nodes") on this machine:
two torchrun.sh invocations rendezvousing on 127.0.0.1; slurm.sbatch under stand-in srun/scontrol,
through a SIGTERM (checkpoint, requeue) and the requeued run that resumes; deepspeed_hostfile.sh
with a two-host hostfile through stand-in ssh/pdsh (a bare environment per "host", as over ssh)."""
from __future__ import annotations

import os
import signal
import time

from tests.launch.helpers import (
    ROOT,
    Launched,
    free_port,
    launch_env,
    run_checked,
    wait_for,
)

TINY = dict(SCALE="tiny", GPUS_PER_NODE=1, EP=2, LOG_INTERVAL=1, OMP_NUM_THREADS=1)
TIMEOUT = 240


def test_torchrun_two_nodes_on_one_machine(tmp_path):
    out = tmp_path / "out"
    env = dict(NNODES=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), OUT_DIR=out,
               TRAIN_ITERS=4, **TINY)
    nodes = [Launched(["bash", str(ROOT / "examples/multinode/torchrun.sh")],
                      launch_env(NODE_RANK=r, **env), tmp_path / f"node{r}.out")
             for r in (0, 1)]
    try:
        codes = [n.wait(TIMEOUT) for n in nodes]
    finally:
        for n in nodes:
            n.stop()
    assert codes == [0, 0], "\n".join(n.text()[-3000:] for n in nodes)
    logs = [out / "logs" / f"self_node{r}.log" for r in (0, 1)]
    assert all(p.exists() for p in logs)
    text = "".join(p.read_text() for p in logs)
    assert "iteration        4/       4" in text and "EP=2" in text
    assert (out / "self" / "checkpoints" / "iter_0000004").is_dir()


def test_slurm_sigterm_checkpoints_requeues_and_resumes(tmp_path):
    out = tmp_path / "out"
    requeues = tmp_path / "scontrol.log"
    env = launch_env(bin_first=True, SLURM_JOB_ID=4242, SLURM_JOB_NUM_NODES=2,
                     SLURM_NTASKS_PER_NODE=1, SLURM_JOB_NODELIST="127.0.0.1,localhost",
                     SLURM_SUBMIT_DIR=ROOT, SCONTROL_LOG=requeues, OUT_DIR=out, ROW="learned",
                     MASTER_PORT=free_port(), TRAIN_ITERS=60, **TINY)
    env.pop("GPUS_PER_NODE")  # from SLURM_NTASKS_PER_NODE
    log0 = out / "logs" / "learned_node0.log"
    script = ["bash", str(ROOT / "examples/multinode/slurm.sbatch")]

    # 1. Preempted: SIGTERM to the batch script (what --signal=B:TERM@120 does).
    job = Launched(script, env, tmp_path / "job1.out")
    try:
        wait_for(log0, " iteration ", [job], TIMEOUT)
        os.kill(job.proc.pid, signal.SIGTERM)
        assert job.wait(TIMEOUT) == 0, job.text()
    finally:
        job.stop()
    text = log0.read_text()
    assert "SIGTERM received (--exit-signal-handler)" in text, text[-3000:]
    assert "forwarding it to the job step" in job.text()
    assert requeues.read_text() == "requeue 4242\n"
    stopped_at = int(text.split("> exiting at iteration ")[1].split(":")[0])
    assert 0 < stopped_at < 60
    assert (out / "learned" / "checkpoints" / f"iter_{stopped_at:07d}").is_dir()
    assert (out / "logs" / "learned_node1.log").exists()

    # 2. The requeued job resumes from that checkpoint and finishes; no second requeue.
    time.sleep(0.5)
    job2 = run_checked(script, dict(env, SLURM_RESTART_COUNT="1"), tmp_path / "job2.out", TIMEOUT)
    text = log0.read_text()
    assert f"resumed from {out}/learned/checkpoints at iteration {stopped_at}" in text
    assert "iteration       60/      60" in text
    assert requeues.read_text() == "requeue 4242\n"
    assert "requeueing" not in job2


def test_deepspeed_hostfile_two_hosts_through_pdsh(tmp_path):
    out = tmp_path / "out"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = launch_env(bin_first=True, HOSTFILE=hostfile, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=free_port(), OUT_DIR=out, ROW="fixed_random", TRAIN_ITERS=4,
                     **TINY)
    env.pop("GPUS_PER_NODE")  # from the hostfile's slots
    text = run_checked(["bash", str(ROOT / "examples/multinode/deepspeed_hostfile.sh")], env,
                       tmp_path / "ds.out", TIMEOUT)
    # DeepSpeed's multi-node path: pdsh over both hosts, node ranks from pdsh's %n.
    assert "cmd = pdsh -S -f 1024 -w localhost,127.0.0.1" in text
    assert "export DS_ACCELERATOR=cpu" in text  # through the generated environment file
    node0 = (out / "logs" / "fixed_random_node0.log").read_text()
    node1 = (out / "logs" / "fixed_random_node1.log").read_text()
    assert "node_rank=0" in node0 and "node_rank=1" in node1
    assert "iteration        4/       4" in node0 and "router fixed-random, EP=2" in node0
    assert not any(line.startswith(("localhost: ", "127.0.0.1: ")) for line in
                   (node0 + node1).splitlines())
    assert (out / "fixed_random" / "checkpoints" / "iter_0000004").is_dir()
