"""Configuration mistakes fail at start-up with the key, the value and the fix (``check_config``);
resuming a run with another configuration, two trainers on one run directory, orphaned ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from linnaeus.config import register_configs
from linnaeus.errors import ConfigError, UserError
from linnaeus.models import build_model
from linnaeus.resume import ResumeConfigError, check_resume, compare_configs
from linnaeus.rundir import RunLock, RunLockedError
from linnaeus.validate import check_config, config_problems
from tests.conftest import REPO

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml") if p.stem != "base")


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("extra", [[], ["debug=fast", "loss=hxe", "augmentation=strong"], ["optimizer=sgd"]])
def test_shipped_configs_pass(model, extra):
    assert config_problems(compose_cfg(f"model={model}", *extra)) == []


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_config_passes(optimizer):
    assert config_problems(compose_cfg(f"optimizer={optimizer}")) == []


BAD_OVERRIDES = {
    # overrides: the start of the one-line message (key=value: what; how to fix)
    "batch_size_zero": (["data.batch_size=0"], "data.batch_size=0: must be a positive integer (per process) or auto"),
    "batch_size_negative": (["data.batch_size=-8"], "data.batch_size=-8: must be a positive integer"),
    "lr_negative": (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001: the learning rate must be a number > 0"),
    "lr_zero": (["optimizer.lr=0"], "optimizer.lr=0: the learning rate must be a number > 0, e.g. optimizer.lr=1e-3"),
    "val_fraction_one": (["data.val_fraction=1.0"], "data.val_fraction=1.0: must be a number in [0, 1)"),
    "val_fraction_negative": (["data.val_fraction=-0.1"], "data.val_fraction=-0.1: must be a number in [0, 1)"),
    "image_size_zero": (["data.image_size=0"], "data.image_size=0: must be an integer >= 1 (e.g. data.image_size=224)"),
    "precision_16": (["train.precision=16"], "train.precision=16: must be one of 32, bf16, fp16; did you mean train.precision=fp16?"),
    "precision_bfloat16": (["train.precision=bfloat16"], "did you mean train.precision=bf16?"),
    "precision_other": (["train.precision=64"], "train.precision=64: must be one of 32, bf16, fp16"),
    "accumulate_zero": (["train.accumulate=0"], "train.accumulate=0: must be an integer >= 1"),
    "log_every_zero": (["train.log_every=0"], "train.log_every=0: must be an integer >= 1"),
    "every_steps_zero": (["checkpoint.every_steps=0"], "checkpoint.every_steps=0: must be an integer >= 1"),
    "keep_last_zero": (["checkpoint.keep_last=0"], "checkpoint.keep_last=0: must be an integer >= 1"),
    "nothing_to_train": (["train.epochs=0", "train.max_steps=null"], "train.epochs=0: with train.max_steps=null nothing"),
    "warmup_fraction": (["scheduler.warmup_fraction=1.5"], "scheduler.warmup_fraction=1.5: must be a number in [0, 1)"),
    "min_lr_ratio": (["scheduler.min_lr_ratio=-0.5"], "scheduler.min_lr_ratio=-0.5: must be a number in [0, 1]"),
    "scheduler_typo": (["scheduler.name=cosin"], "scheduler.name=cosin: must be one of cosine, linear, constant"),
    "betas": (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5]: must be two numbers [low, high] with both in [0, 1)"),
    "weight_decay": (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1: must be a number >= 0"),
    "optimizer_unknown_key": (["+optimizer.foo=1"], "optimizer.foo=1: is not an argument of torch.optim.AdamW"),
    "optimizer_typo": (["+optimizer.weight_decy=0.1"], "did you mean optimizer.weight_decay?"),
    "label_smoothing": (["loss.label_smoothing=1.0"], "loss.label_smoothing=1.0: must be a number in [0, 1)"),
    "taxonomy_alpha": (["loss.taxonomy_smoothing.alpha=2"], "loss.taxonomy_smoothing.alpha=2.0: must be a number in [0, 1)"),
    "hflip": (["augmentation.hflip=1.5"], "augmentation.hflip=1.5: must be a number in [0, 1]"),
    "scale": (["augmentation.scale=[0.9,0.1]"], "augmentation.scale=[0.9, 0.1]: must be two numbers [low, high]"),
    "val_every_negative": (["train.val_every=-1"], "train.val_every=-1: must be an integer >= 0"),
    "workers_negative": (["data.num_workers=-1"], "data.num_workers=-1: must be an integer >= 0"),
    "sampler_mode": (["data.sampler.mode=grouped"], "data.sampler.mode=grouped: must be one of random, strict-group, mixed-pairs"),
    "log_level": (["log_level=LOUD"], "log_level=LOUD: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    "wandb_mode": (["logger.wandb.mode=offlin"], "logger.wandb.mode=offlin: must be one of offline, online, disabled; did you mean logger.wandb.mode=offline?"),
    "model_unknown_key": (["+model.unknown_key=3"], "unknown key(s) model.unknown_key for linnaeus.models.mformer.MFormerV1"),
    "model_typo": (["+model.drop_pth_rate=0.1"], "model.drop_pth_rate (did you mean model.drop_path_rate?)"),
    "timm_name": (["model=timm", "model.name=convnxt_tiny"], "model.name=convnxt_tiny: is not a timm model (see timm.list_models()); did you mean convnext_tiny"),
    "h5_without_labels": (["data=h5"], "data.labels and data.images not set: required with data=h5"),
    "labels_missing_file": (["data=h5", "data.labels=/nowhere/labels.h5", f"data.images={REPO}"], "data.labels=/nowhere/labels.h5: no such file"),
    "labels_is_folder": (["data=h5", f"data.labels={REPO}", f"data.images={REPO}"], f"data.labels={REPO}: is a folder"),
    "device_unknown": (["train.device=gpu"], "train.device=gpu: must be auto, cpu, cuda or cuda:N"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_values_are_named_with_the_fix(case):
    overrides, expected = BAD_OVERRIDES[case]
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg("debug=fast", *overrides))
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert isinstance(err.value, UserError)


def test_several_problems_in_one_line():
    with pytest.raises(ConfigError, match=r"^3 configuration problems: data.batch_size=0: .*; train.log_every=0: .*; "
                                          r"optimizer.lr=-1: "):  # fmt: skip
        check_config(compose_cfg("data.batch_size=0", "optimizer.lr=-1", "train.log_every=0"))


def test_batch_size_auto_is_accepted():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_cfg(), resolve=True)
    for good in ("auto", 32, "64"):
        cfg["data"]["batch_size"] = good
        assert config_problems(cfg) == []
    cfg["data"]["batch_size"] = "big"
    assert config_problems(cfg) == [
        "data.batch_size=big: must be a positive integer (per process) or auto, e.g. data.batch_size=64"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu():
    with pytest.raises(
        ConfigError,
        match=r"train.device=cuda: no CUDA GPU is visible to this process; use train.device=auto or cpu",
    ):
        check_config(compose_cfg("train.device=cuda"))


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "text", "zip", "safetensors_bad"])
def test_pretrained_file_must_be_a_checkpoint(kind, tmp_path):
    path = {"missing": tmp_path / "none.pt", "folder": tmp_path}.get(kind, tmp_path / "w.pt")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("these are not weights")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    elif kind == "safetensors_bad":
        path = tmp_path / "w.safetensors"
        path.write_bytes(b"\xff" * 32)
    expected = {"missing": "no such file", "folder": "is a folder", "empty": "the file is empty",
                "text": "is not a checkpoint", "zip": "not one written by torch.save",
                "safetensors_bad": "not a valid safetensors file"}[kind]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(f"model.pretrained={path}"))
    message = str(err.value)
    assert message.startswith(f"model.pretrained={path}: ") and expected in message
    assert message.endswith("; give a weights file or model.pretrained=null")


def test_real_checkpoints_pass_the_pretrained_check(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    assert config_problems(compose_cfg(f"model.pretrained={tmp_path / 'w.pt'}")) == []


def test_model_builder_names_unknown_keys():
    cfg = compose_cfg("model=mformer_xs", "+model.unknown_key=3").model
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) model.unknown_key for linnaeus.models.mformer.MFormerV1"
    ):
        build_model(cfg, [3, 5], {})


# ---------------------------------------------------------------------- resuming with another configuration
def _container(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_cfg("debug=fast", *overrides), resolve=True)


def test_safe_changes_resume():
    old = _container()
    new = _container("train.max_steps=20", "logger.wandb.mode=disabled", "data.num_workers=3", "train.log_every=5",
                     "checkpoint.keep_last=1", "train.val_every=4", "log_level=DEBUG")  # fmt: skip
    safe, unsafe = compare_configs(old, new)
    assert unsafe == []
    assert "train.max_steps: 6 -> 20" in safe and "data.num_workers: 0 -> 3" in safe
    assert "logger.wandb.mode: offline -> disabled" in safe
    assert check_resume(old, new) == safe


@pytest.mark.parametrize(
    "override, line",
    [
        ("optimizer.lr=3e-4", "optimizer.lr: 0.001 -> 0.0003"),
        ("model.drop_path_rate=0.2", "model.drop_path_rate: 0.05 -> 0.2"),
        ("loss.label_smoothing=0.1", "loss.label_smoothing: 0.0 -> 0.1"),
        ("data.batch_size=16", "data.batch_size: 8 -> 16"),
        ("data.image_size=48", "data.image_size: 32 -> 48"),
        ("seed=1", "seed: 0 -> 1"),
        ("scheduler.name=linear", "scheduler.name: cosine -> linear"),
        ("augmentation.hflip=0.0", "augmentation.hflip: 0.5 -> 0.0"),
    ],
)
def test_unsafe_changes_refuse_to_resume_with_the_ways_out(override, line):
    old, new = _container(), _container(override)
    _, unsafe = compare_configs(old, new)
    assert unsafe == [line]
    with pytest.raises(ResumeConfigError) as err:
        check_resume(old, new, where="outputs/demo/run")
    message = str(err.value)
    assert message.startswith(
        f"cannot resume outputs/demo/run: it was started with a different configuration ({line})"
    )
    assert (
        "Rerun the original command" in message
        and "name=<new name>" in message
        and "hydra.run.dir=" in message
    )
    assert "\n" not in message


def test_resume_compares_paths_resolved_and_tolerates_new_keys(tmp_path):
    os.chdir(tmp_path)
    old = {"data": {"labels": "ds/labels.h5"}, "train": {"epochs": 1}}
    new = {"data": {"labels": str(tmp_path / "ds" / "labels.h5")}, "train": {"epochs": 1, "new_option": True}}
    safe, unsafe = compare_configs(old, new)
    assert unsafe == [] and safe == ["train.new_option: <absent> -> True"]
    os.chdir(REPO)


# ---------------------------------------------------------------------- one trainer per run directory
def test_second_trainer_is_refused_with_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError) as err:
            RunLock(tmp_path).acquire()
    message = str(err.value)
    assert f"another trainer is using the run directory {tmp_path} (pid {os.getpid()} on " in message
    assert f"kill {os.getpid()}" in message and "hydra.run.dir=" in message
    with RunLock(tmp_path):  # released: free again
        pass


def test_lock_of_a_killed_trainer_is_taken_over(tmp_path):
    code = f"from linnaeus.rundir import RunLock; import time; RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    lock = RunLock(tmp_path).acquire()
    assert lock.previous["pid"] == holder.pid
    lock.release()


def test_children_of_a_killed_trainer_do_not_keep_the_lock(tmp_path):
    """Data-loading workers are forked children; they may outlive a SIGKILLed trainer for seconds."""
    code = (
        f"import os, time; from linnaeus.rundir import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
        "child = os.fork()\n"
        "if child == 0:\n    time.sleep(30); os._exit(0)\n"
        "print(child, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child still runs
        lock = RunLock(tmp_path).acquire()  # and the directory is free
        assert lock.previous["pid"] == holder.pid
        lock.release()
    finally:
        os.kill(child, 9)


def test_ranks_exit_when_their_launcher_dies(tmp_path):
    """A launcher killed with SIGKILL: its child notices within seconds and exits instead of running on."""
    child_code = (
        "import time, logging; from linnaeus.rundir import watch_parent; watch_parent(interval=0.2, grace=2); "
        "print('ready', flush=True); time.sleep(60); print('still running', flush=True)"
    )
    launcher_code = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}], stdout=open({str(tmp_path / 'out')!r}, 'w')); "
        "print(child.pid, flush=True); time.sleep(60)"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", launcher_code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    child_pid = int(launcher.stdout.readline())
    deadline = time.monotonic() + 60
    while "ready" not in (tmp_path / "out").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child_pid):
        time.sleep(0.1)
    assert not _alive(child_pid), "the orphaned child kept running"
    assert "still running" not in (tmp_path / "out").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init to reap it is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
