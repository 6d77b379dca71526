"""SLURM support: the rendezvous and host-list functions, the launcher presets, and sweeps on a real
single-node SLURM cluster started by ``scripts/slurm_local.sh`` (Debian's slurm-wlm and munge)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from linnaeus.checkpoint import load_checkpoint
from linnaeus.dist import (
    agree_flags,
    expand_hostlist,
    make_control_group,
    master_port_for_job,
    slurm_rendezvous,
    submitit_local_rendezvous,
)
from linnaeus.logger import cluster_info, read_metrics, sweep_group
from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "slurm_local.sh"
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
FAST = ["debug=fast", "model=mformer_xs"]


# ---------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("vm", ["vm"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("a,b[009-011]", ["a", "b009", "b010", "b011"]),
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
        ("x[3]", ["x3"]),
        ("n1.cluster.org,n2.cluster.org", ["n1.cluster.org", "n2.cluster.org"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "node[a-c]", "node[5-2]"])
def test_expand_hostlist_rejects_malformed_lists(bad):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(bad)


def step_env(**overrides) -> dict:
    """The variables srun gives task 3 of 4 on two nodes of job 12345."""
    env = {
        "SLURM_JOB_ID": "12345",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_slurm_rendezvous_from_a_job_step():
    assert slurm_rendezvous(step_env()) == {
        "rank": 3,
        "local_rank": 1,
        "world_size": 4,
        "master_addr": "gpu07",
        "master_port": 20000 + 12345 % 20000,
    }
    # every task of a job derives the same port, and a requeued job (same id) too
    assert master_port_for_job("45000") == master_port_for_job(45000) == 25000
    assert 20000 <= master_port_for_job(987654321) < 40000
    # without a step node list the job's is used
    assert (
        slurm_rendezvous(step_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST="a1,b2"))["master_addr"]
        == "a1"
    )
    # a prepared rendezvous wins
    given = slurm_rendezvous(step_env(MASTER_ADDR="head", MASTER_PORT="29500"))
    assert (given["master_addr"], given["master_port"], given["rank"]) == ("head", 29500, 3)


@pytest.mark.parametrize(
    "overrides",
    [
        {"SLURM_STEP_ID": None},  # the batch script itself: SLURM_PROCID=0 is set there too
        {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"},  # a single-task job
        {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},  # torchrun inside an allocation
        {"SLURM_PROCID": None},
    ],
)
def test_no_slurm_rendezvous_outside_a_multi_task_step(overrides):
    assert slurm_rendezvous(step_env(**overrides)) is None


def test_submitit_local_rendezvous():
    env = {
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "4242",
    }
    assert submitit_local_rendezvous(env) == {
        "rank": 1,
        "local_rank": 1,
        "world_size": 2,
        "master_addr": "127.0.0.1",
        "master_port": 24242,
    }
    assert submitit_local_rendezvous({**env, "SUBMITIT_LOCAL_NTASKS": "1"}) is None
    assert submitit_local_rendezvous({**env, "RANK": "1", "WORLD_SIZE": "2"}) is None


def test_process_rank_before_the_process_group_forms():
    """Only rank 0 locks the run directory, so every launcher's rank must be known before init."""
    from linnaeus.dist import process_rank

    assert process_rank(step_env()) == 3  # a SLURM step's task 3
    local = {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_JOB_ID": "7"}
    assert process_rank(local) == 1  # a local submitit job's second task
    assert process_rank({"RANK": "1", "WORLD_SIZE": "2"}) == 1  # torchrun
    assert process_rank({}) == 0
    assert process_rank(step_env(SLURM_STEP_ID=None)) == 0  # the batch script itself


def test_cluster_info_from_slurm_variables():
    env = {
        "SLURM_JOB_ID": "118",
        "SLURM_ARRAY_JOB_ID": "117",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_RESTART_COUNT": "2",
        "SLURM_JOB_PARTITION": "debug",
        "SLURM_JOB_NODELIST": "vm",
        "SLURM_NTASKS": "2",
        "HOME": "/root",
    }
    assert cluster_info(env) == {
        "job_id": "118",
        "restart_count": 2,
        "array_job_id": "117",
        "array_task_id": 1,
        "partition": "debug",
        "nodelist": "vm",
        "num_tasks": 2,
    }
    # a first start has no SLURM_RESTART_COUNT; a job that is no array has no array keys
    assert cluster_info({"SLURM_JOB_ID": "5"}) == {"job_id": "5", "restart_count": 0}
    assert cluster_info({"HOME": "/root"}) == {}


def test_sweep_group_is_the_sweep_directory():
    assert sweep_group("outputs/demo/multirun") == "demo/multirun"
    assert sweep_group(Path("/scratch/me/lr_search")) == "me/lr_search"
    assert sweep_group("sweep") == "sweep"


def _agree_worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    group = make_control_group()
    # rank 0 wants to stop, rank 1 wants a checkpoint: both must learn both
    results[rank] = (
        agree_flags([rank == 0, rank == 1, 0], group),
        agree_flags([3 if rank else 1], group),
        group is not None,
    )
    dist.destroy_process_group()


def test_agree_flags_takes_the_maximum_over_ranks(tmp_path):
    assert make_control_group() is None
    assert agree_flags([True, False, 2], None) == [1, 0, 2]  # one process: unchanged
    results = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert dict(results) == {0: ([1, 1, 0], [3], True), 1: ([1, 1, 0], [3], True)}


def test_launcher_presets_map_onto_the_submitit_plugin(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from omegaconf import OmegaConf

    from linnaeus.train import CONFIG_DIR

    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(
            "config", overrides=[*overrides, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True
        )
        slurm = cfg.hydra.launcher
        local = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and local._target_.endswith("LocalLauncher")
    # every key of the presets is a field of the plugin's config (no key silently ignored)
    assert set(slurm) <= set(OmegaConf.structured(SlurmQueueConf))
    assert set(local) <= set(OmegaConf.structured(LocalQueueConf))
    for key in (
        "partition",
        "account",
        "qos",
        "timeout_min",
        "nodes",
        "gpus_per_node",
        "tasks_per_node",
        "cpus_per_task",
        "mem_gb",
        "signal_delay_s",
        "max_num_timeout",
        "additional_parameters",
        "setup",
    ):
        assert key in slurm, key
    assert (slurm.partition, slurm.account, slurm.qos) == ("gpu", "lab", None)
    assert slurm.max_num_timeout > 0 and slurm.additional_parameters.requeue is True
    # submitit's folder lies in the sweep directory, named by the SLURM job id (kept by a requeue)
    assert slurm.submitit_folder == f"{tmp_path}/.submitit/%j"


# ---------------------------------------------------------------------- a real SLURM
@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A running single-node cluster: reused when one runs, else started here and stopped at the end."""
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge"
        )
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    started = status.returncode != 0
    out = status.stdout
    if started:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"scripts/slurm_local.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        out = proc.stdout
    conf = next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith("export SLURM_CONF="))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # submitit calls sbatch, squeue and scontrol from this process
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if started:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def submitit_logs(sweep_dir: Path) -> str:
    """The tail of every task's submitit log, for failure messages."""
    parts = []
    for path in sorted(sweep_dir.glob(".submitit/*/*_log.*")):
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2500:]}")
    return "\n".join(parts)


def job_ids(sweep_dir: Path) -> list[str]:
    """The SLURM ids (``<array job>_<task>``) of a sweep's jobs, from submitit's folders."""
    folders = sweep_dir.glob(".submitit/*")
    return sorted(p.name for p in folders if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name))


def cancel_jobs(sweep_dir: Path) -> None:
    """A failed test leaves no job running on the shared cluster."""
    ids = job_ids(sweep_dir)
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def sweep_command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        *FAST,
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def run_sweep(sweep_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = sweep_command(sweep_dir, *overrides)
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
        )
    finally:
        cancel_jobs(sweep_dir)  # no-op once the jobs are done
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{submitit_logs(sweep_dir)}"
    )
    return proc


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a W&B offline ``.wandb`` file (a LevelDB-style log: 32 KiB blocks of
    chunks, each with a 7-byte header: checksum, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(run_dir: Path, index: int = -1):
    """The run record (id, group, config) of the run directory's W&B offline run (the last one by default)."""
    files = sorted(run_dir.glob("wandb/offline-run-*/*.wandb"))
    assert files, f"no W&B offline run in {run_dir}"
    runs = [r.run for r in wandb_records(files[index]) if r.WhichOneof("record_type") == "run"]
    assert runs
    return runs[0]


def wandb_config(run) -> dict:
    return {item.key: json.loads(item.value_json) for item in run.config.update}


def test_local_cluster_script_runs_a_node_with_every_cpu(slurm_cluster):
    info = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %c %P %T"], capture_output=True, text=True, timeout=30
    )
    node, cpus, partition, state = info.stdout.split()
    assert node == subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert int(cpus) == os.cpu_count() and partition == "debug*" and state in ("idle", "mixed", "allocated")
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0 and "running" in status.stdout
    conf = Path(slurm_cluster).read_text()
    for line in (
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SlurmUser=root",
        "JobRequeue=1",
    ):
        assert line in conf.splitlines(), line
    # the pure-Python host-list parser agrees with SLURM's own
    hostlist = "node[01-03,07],gpu5,rack[1-2]-n[8-9]"
    real = subprocess.run(
        ["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, timeout=30
    )
    assert expand_hostlist(hostlist) == real.stdout.split()


@pytest.mark.slow
def test_two_job_sweep_on_slurm(tmp_path, demo_cache, slurm_cluster):
    sweep = tmp_path / "sweep"
    run_sweep(sweep, "logger.wandb.mode=offline", "optimizer.lr=1e-3,3e-4")

    run_dirs = sorted(p.parent.parent for p in sweep.glob("*/checkpoints/last.pt"))
    assert [p.name.rsplit("optimizer.lr=", 1)[1] for p in run_dirs] == ["0.0003", "0.001"]
    run_ids, groups = set(), set()
    for run_dir, lr in zip(run_dirs, (3e-4, 1e-3)):
        ckpt = load_checkpoint(run_dir / "checkpoints/last.pt")
        assert ckpt["train_state"]["step"] == 6
        assert ckpt["config"]["optimizer"]["lr"] == lr
        steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
        assert steps == [1, 2, 3, 4, 5, 6]
        run = wandb_run(run_dir)
        run_ids.add(run.run_id)
        groups.add(run.run_group)
        cluster = wandb_config(run)["cluster"]
        assert cluster["restart_count"] == 0 and cluster["partition"] == "debug"
        assert cluster["array_task_id"] in (0, 1) and cluster["job_id"].isdigit()
        assert (
            f"SLURM job {cluster['job_id']} (array {cluster['array_job_id']}"
            in (run_dir / "train.log").read_text()
        )
    assert len(run_ids) == 2  # one W&B run per job ...
    assert groups == {sweep_group(sweep)}  # ... in one group per sweep
    # submitit's logs: one folder per array task, in the sweep directory
    assert len(list(sweep.glob(".submitit/*_*/*_0_log.out"))) == 2


# drop path off and ranks without unknown labels: two runs with the same ranks take the same steps
EXACT = [
    "model.drop_path_rate=0.0",
    "data.task_keys=[taxa_L40,taxa_L30]",
    "train.max_steps=4",
    "train.val_every=4",
    "logger.wandb.mode=disabled",
    "data.batch_size=4",
]


def assert_one_ddp_run_like(run_dir: Path, reference: dict) -> None:
    ckpt = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert ckpt["train_state"]["step"] == reference["train_state"]["step"] == 4
    assert len(ckpt["rng"]) == 2  # two ranks saved their RNG state: one process group, not two runs
    for key, value in reference["model"].items():
        torch.testing.assert_close(ckpt["model"][key], value, atol=1e-5, rtol=0, msg=key)
    # rank 0 alone wrote the metrics: each step once
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4]
    assert "4 x 2 ranks" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_two_task_jobs_are_one_ddp_run_equal_to_torchrun(tmp_path, demo_cache, slurm_cluster):
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    assert cpus >= 2, "the SLURM node needs 2 CPUs for a 2-task job"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, "train.py", *FAST, *EXACT, f"hydra.run.dir={tmp_path / 'torchrun'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=os.environ.copy())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    reference = load_checkpoint(tmp_path / "torchrun/checkpoints/last.pt")

    # on SLURM: srun starts the two tasks of the job
    sweep = tmp_path / "slurm"
    run_sweep(sweep, "hydra.launcher.tasks_per_node=2", *EXACT)
    (run_dir,) = [p.parent.parent for p in sweep.glob("*/checkpoints/last.pt")]
    assert_one_ddp_run_like(run_dir, reference)
    assert len(list(sweep.glob(".submitit/*/*_1_log.out"))) == 1  # the second task's log

    # submitit's local executor: the same job layout without a scheduler
    local = tmp_path / "local"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.tasks_per_node=2",
        *FAST,
        *EXACT,
        f"hydra.sweep.dir={local}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=os.environ.copy())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}\n{submitit_logs(local)}"
    (run_dir,) = [p.parent.parent for p in local.glob("*/checkpoints/last.pt")]
    assert_one_ddp_run_like(run_dir, reference)


# the signal comes right after the first checkpoint (step 2), well before the last step
PREEMPT = [
    "train.max_steps=40",
    "checkpoint.every_steps=2",
    "train.val_every=10",
    "data.num_workers=1",
    "logger.wandb.mode=offline",
]


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_bit_identically(tmp_path, demo_cache, slurm_cluster):
    sweep = tmp_path / "sweep"
    cmd = sweep_command(sweep, *PREEMPT)
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as out:
        sweep_proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    try:
        deadline = time.time() + 300
        while not list(sweep.glob("*/checkpoints/step_00000002.pt")):
            assert sweep_proc.poll() is None, f"the sweep ended early:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"no checkpoint after 300 s\n{submitit_logs(sweep)}"
            time.sleep(0.2)
        (job_id,) = job_ids(sweep)
        # what SLURM sends signal_delay_s before the time limit, or a pre-empting scheduler
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        assert sweep_proc.wait(timeout=600) == 0, f"{log_path.read_text()[-3000:]}\n{submitit_logs(sweep)}"
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.send_signal(signal.SIGINT)
            sweep_proc.wait(timeout=60)
        cancel_jobs(sweep)

    (run_dir,) = [p.parent.parent for p in sweep.glob("*/checkpoints/last.pt")]
    train_log = (run_dir / "train.log").read_text()
    assert "stopped by SIGUSR2" in train_log, "the job was not stopped by the signal"
    assert "resumed from" in train_log
    assert "restart 1" in train_log  # SLURM_RESTART_COUNT of the requeued job
    # the same W&B run resumed: one id over both starts, the second start's config says restart 1
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1
    assert wandb_config(wandb_run(run_dir, 0))["cluster"]["restart_count"] == 0
    assert wandb_config(wandb_run(run_dir, 1))["cluster"]["restart_count"] == 1
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40

    straight = tmp_path / "straight"
    cmd = [sys.executable, "train.py", *FAST, *PREEMPT, f"hydra.run.dir={straight}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=os.environ.copy())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-5000:]}"
    a = load_checkpoint(straight / "checkpoints/last.pt")
    b = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert a["train_state"] == b["train_state"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
