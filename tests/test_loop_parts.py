"""The pieces the training loop is made of: schedules, optimizer groups, cadence, early stopping, EMA,
the non-finite guard and the logging window; each tested alone against numbers worked out by hand."""

from __future__ import annotations

import math
import signal

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from linnaeus.cadence import Cadence, EarlyStopping
from linnaeus.config import register_configs
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.ema import NoEMA, build_ema
from linnaeus.guard import SkipGuard, WatchGuard, build_guard
from linnaeus.metrics import MetricAccumulator
from linnaeus.models import build_model
from linnaeus.optim import ParameterGroupError, build_optimizer
from linnaeus.schedule import build_lr_schedule, lr_multiplier
from linnaeus.signals import StopSignals
from linnaeus.window import LogWindow
from tests.conftest import REPO


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def tiny_model(config: str = "mformer_xs", **extra):
    cfg = OmegaConf.load(REPO / f"conf/model/{config}.yaml")
    for key, value in extra.items():
        OmegaConf.update(cfg, key, value)
    return build_model(cfg, [3, 5], {"spatial": 3}, None)


# ---------------------------------------------------------------------- schedules
def test_step_schedule_multiplies_by_gamma_at_each_milestone():
    kw = dict(total_steps=100, warmup_steps=0, name="step", gamma=0.5)
    values = [lr_multiplier(s, milestones=[30, 0.6], **kw) for s in range(100)]  # 0.6 of 100 = step 60
    assert values[0] == values[29] == 1.0
    assert values[30] == values[59] == 0.5
    assert values[60] == values[99] == 0.25


@pytest.mark.parametrize(
    "shape, midpoint", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))]
)
def test_wsd_is_flat_then_decays_over_the_last_fraction(shape, midpoint):
    kw = dict(total_steps=100, warmup_steps=10, name="wsd", decay_fraction=0.2, decay_shape_name=shape)
    values = [lr_multiplier(s, **kw) for s in range(101)]
    assert values[5] == pytest.approx(6 / 11)  # warm-up
    assert all(v == 1.0 for v in values[10:80])  # stable
    assert values[90] == pytest.approx(midpoint)  # half-way through the decay
    assert values[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[80:], values[81:]))


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "step", "wsd"])
def test_every_schedule_composes_and_is_a_pure_function_of_the_step(name):
    cfg = compose_cfg(f"scheduler.name={name}")
    a, b = build_lr_schedule(cfg.scheduler, 200), build_lr_schedule(cfg.scheduler, 200)
    steps = [150, 3, 77, 3, 199, 0]
    assert [a(s) for s in steps] == [b(s) for s in reversed(steps)][::-1]
    assert all(0 <= a(s) <= 1 for s in range(200))


def test_scheduler_config_files_select_their_schedule():
    assert compose_cfg("scheduler=wsd").scheduler.name == "wsd"
    assert compose_cfg("scheduler=step").scheduler.milestones == [0.6, 0.85]


# ---------------------------------------------------------------------- optimizers
def test_default_optimizer_is_fused_adamw_with_decay_groups():
    model = tiny_model()
    opt = build_optimizer(model, compose_cfg().optimizer)
    assert opt.names == ["default"]
    (adamw,) = list(opt)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] is True
    decay = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim > 1 and "norm" not in name and "token" not in name), name


def test_muon_takes_the_attention_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = build_optimizer(model, compose_cfg("optimizer=muon").optimizer)
    assert opt.names == ["default", "muon"]
    adamw, muon = list(opt)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    assert muon_names and all(n.startswith("attn_stage") and ".blocks." in n for n in muon_names)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    every = [id(p) for o in opt for g in o.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_a_parameter_in_two_groups_or_none_is_named_at_start_up():
    model = tiny_model()
    cfg = OmegaConf.create(
        {
            "_target_": "torch.optim.AdamW",
            "lr": 1e-3,
            "groups": [{"name": "a", "match": ["stem.*"]}, {"name": "b", "match": ["stem.0.*"]}],
        }
    )
    with pytest.raises(ParameterGroupError, match=r"stem\.0\.weight \(a, b\)"):
        build_optimizer(model, cfg)
    cfg = OmegaConf.create(
        {
            "_target_": None,
            "groups": [{"name": "a", "match": ["heads.*"], "_target_": "torch.optim.SGD", "lr": 0.1}],
        }
    )
    with pytest.raises(ParameterGroupError, match=r"selected by no group.*stem\.0\.weight"):
        build_optimizer(model, cfg)


@pytest.mark.parametrize(
    "model_name, extra", [("mformer_xs", {}), ("mformer_v0_sm", {}), ("timm", {"name": "resnet18"})]
)
def test_layer_decay_scales_the_lr_from_the_heads_down(model_name, extra):
    model = tiny_model(model_name, **extra)
    cfg = compose_cfg("optimizer.layer_decay=0.5").optimizer
    opt = build_optimizer(model, cfg)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    ids = model.layer_ids()
    top = max(ids.values())
    for name, p in named.items():
        assert scale[id(p)] == pytest.approx(0.5 ** (top - ids[name])), name
    assert all(scale[id(p)] == 1.0 for p in model.heads.parameters())
    assert min(scale.values()) < 0.5**3  # the stem is several layers below the heads
    opt.set_lr(0.1)
    assert all(g["lr"] == pytest.approx(g["base_lr"] * g["lr_scale"] * 0.1) for g in opt.param_groups)


def test_optimizer_state_round_trips_for_two_optimizers():
    torch.manual_seed(0)
    model = tiny_model()
    cfg = compose_cfg("optimizer=muon").optimizer
    opt = build_optimizer(model, cfg)
    images, meta = torch.randn(2, 3, 32, 32), {"spatial": torch.randn(2, 3)}
    valid = {"spatial": torch.ones(2, dtype=torch.bool)}
    sum(o.sum() for o in model(images, meta, valid)).backward()
    opt.step()
    again = build_optimizer(model, cfg)
    again.load_state_dict(opt.state_dict())
    for a, b in zip(opt, again):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and all(
            torch.equal(sa[k][f], sb[k][f]) for k in sa for f in sa[k] if torch.is_tensor(sa[k][f])
        )
    with pytest.raises(ValueError, match="checkpoint holds optimizers"):
        build_optimizer(model, compose_cfg().optimizer).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 0.25), ("sqrt", 0.5)])
def test_lr_scaling_by_global_batch(rule, factor):
    from linnaeus.optim import scale_lr_for_batch

    opt = build_optimizer(tiny_model(), compose_cfg().optimizer)
    assert scale_lr_for_batch(opt, rule, 64, 256) == pytest.approx(factor)
    assert all(g["base_lr"] == pytest.approx(1e-3 * factor) for g in opt.param_groups)


# ---------------------------------------------------------------------- cadence and early stopping
def test_cadence_is_a_schedule_of_actions():
    cadence = Cadence(total_steps=10, log_every=2, val_every=4, save_every=3)
    table = {s: cadence.after_step(s, end_of_epoch=False) for s in range(1, 11)}
    assert [s for s, a in table.items() if a.log] == [2, 4, 6, 8, 10]
    assert [s for s, a in table.items() if a.validate] == [4, 8, 10]
    assert [s for s, a in table.items() if a.save] == [3, 4, 6, 8, 9, 10]
    assert [s for s, a in table.items() if a.stop] == [10]
    epoch = Cadence(total_steps=10, log_every=5, val_every=0, save_every=100)
    assert (
        epoch.after_step(7, end_of_epoch=True).validate
        and not epoch.after_step(7, end_of_epoch=False).validate
    )
    stop = cadence.after_step(5, end_of_epoch=False, stop_requested=True)
    assert stop.save and stop.stop and not stop.log and not stop.validate
    assert cadence.after_step(5, end_of_epoch=False, save_due=True).save


def test_early_stopping_counts_validations_without_improvement():
    stopper = EarlyStopping("val/top1/x", "max", patience=2, min_delta=0.01)
    seen = [
        stopper.update({"val/top1/x": v}, step) for step, v in enumerate([0.5, 0.6, 0.605, 0.7, 0.7, 0.69], 1)
    ]
    assert seen == [False, False, False, False, False, True]
    assert stopper.best == 0.7 and stopper.best_step == 4
    restored = EarlyStopping("val/top1/x", "max", patience=2, min_delta=0.01)
    restored.load_state_dict(stopper.state_dict())
    assert restored.stopped and restored.bad_validations == 2
    low = EarlyStopping("val/loss", "min", patience=1)
    assert not low.update({"val/loss": 2.0}, 1) and not low.update({"val/loss": 1.0}, 2)
    assert low.update({"val/loss": 1.5}, 3)
    assert not EarlyStopping(None).update({}, 1)
    with pytest.raises(KeyError, match="val/top1/taxa_L10"):
        EarlyStopping("val/nope").update({"val/top1/taxa_L10": 1.0}, 1)


# ---------------------------------------------------------------------- EMA
def test_ema_follows_the_weights_with_its_decay_and_updates_every_n_steps():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    cfg = OmegaConf.create({"decay": 0.5, "warmup": False, "warmup_power": 0.75, "every": 2})
    ema = build_ema(cfg, model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=1)  # not a multiple of every: no update
    assert torch.equal(ema.module.weight, torch.zeros(1, 2))
    ema.update(model, step=2)  # first update copies (timm's decay is 0 at the first step)
    ema.update(model, step=4)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=6)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.5 * 1.0 + 0.5 * 3.0))
    assert isinstance(build_ema(OmegaConf.create({"decay": None}), model), NoEMA)


# ---------------------------------------------------------------------- non-finite guard and window
def test_watch_guard_counts_bad_steps_on_the_device_and_skip_guard_skips():
    guard = build_guard(0, torch.device("cpu"))
    assert isinstance(guard, WatchGuard) and not isinstance(guard, SkipGuard)
    finite, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert guard.allows(finite, finite) and guard.allows(nan, finite) and guard.allows(finite, inf)
    assert guard.bad.item() == 2
    fp16 = build_guard(0, torch.device("cpu"), check_grad_norm=False)
    fp16.allows(finite, inf)  # the gradient scaler handles overflowing gradients
    assert fp16.bad.item() == 0
    skip = build_guard(2, torch.device("cpu"))
    assert [skip.allows(x, finite) for x in (finite, nan, nan, finite, nan)] == [
        True,
        False,
        False,
        True,
        False,
    ]
    assert skip.skipped == 3 and skip.bad.item() == 1  # the third bad step is one too many


def test_log_window_state_round_trips_so_a_resumed_row_averages_the_same_steps():
    window = LogWindow(2, torch.device("cpu"))
    for value in (1.0, 2.0, 4.0):
        window.add(torch.tensor(value), torch.tensor([value, 2 * value]), images=8)
        window.steps += 1
    state = window.state_dict(window.reduced())
    restored = LogWindow(2, torch.device("cpu"))
    restored.load_state_dict(state, is_main=True)
    assert torch.equal(restored.loss, window.loss) and restored.steps == 3 and restored.images == 24
    other_rank = LogWindow(2, torch.device("cpu"))
    other_rank.load_state_dict(state, is_main=False)
    assert other_rank.loss.abs().sum() == 0 and other_rank.steps == 3


def test_log_window_counts_only_training_time_while_paused_and_after(monkeypatch):
    """images/s is images over training seconds: a pause (validation, a checkpoint) is left out
    once, and a window read while paused is not charged the paused stretch a second time."""
    clock = iter([100.0, 102.0, 106.0, 106.5])  # a paused window does not read the clock
    monkeypatch.setattr("linnaeus.window.time.perf_counter", lambda: next(clock))
    window = LogWindow(num_tasks=1, device=torch.device("cpu"))  # clock 100: window opens
    window.add(torch.tensor(1.0), torch.tensor([1.0]), images=64)
    window.pause()  # 102: 2 s of training
    assert window.seconds() == 2.0  # read while paused (the log row)
    assert window.state_dict(window.reduced())["train_seconds"] == 2.0  # a checkpoint while paused
    window.resume()  # 106: 1 s of validation left out
    assert window.seconds() == 2.5  # 106.5
    assert window.images / 2.5 == 25.6


def test_validation_loss_is_weighted_by_samples_not_batches():
    tax = Taxonomy(["taxa_L10"], [np.array([0, 1, 2])], [["?", "a", "b"]], [None])
    acc = MetricAccumulator(tax, torch.device("cpu"))
    logits = [torch.tensor([[0.0, 5.0, 0.0]] * 3)]
    acc.update(logits, torch.tensor([[1], [1], [1]]), torch.tensor(1.0))  # 3 samples at loss 1
    acc.update([logits[0][:1]], torch.tensor([[1]]), torch.tensor(5.0))  # 1 sample at loss 5
    assert acc.compute()["loss"] == pytest.approx((3 * 1.0 + 5.0) / 4)  # not (1 + 5) / 2


# ---------------------------------------------------------------------- signals
def test_stop_signals_record_the_first_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGUSR2)
    signals = StopSignals().install()
    try:
        assert not signals.requested
        signal.raise_signal(signal.SIGUSR2)
        signal.raise_signal(signal.SIGINT)
        assert signals.requested and signals.name == "SIGUSR2"
        signals.hand_over()  # the previous handler was the default: nothing happens
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_under_a_scheduler_sigterm_asks_for_a_checkpoint_and_usr2_is_handed_over():
    calls = []
    previous = {
        s: signal.signal(s, lambda signum, frame: calls.append(signum))
        for s in (signal.SIGTERM, signal.SIGUSR2)
    }
    signals = StopSignals().install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert signals.save_requested and not signals.requested
        signal.raise_signal(signal.SIGUSR2)
        assert signals.requested and calls == []
        signals.hand_over()
        assert calls == [signal.SIGUSR2]
    finally:
        signals.restore()
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------- auto batch size
@pytest.mark.parametrize("edge", [1, 7, 8, 9, 100, 333, 4096])
def test_batch_size_search_finds_the_edge_with_few_trials(edge):
    from linnaeus.autobatch import search_batch_size

    tried = []

    def fits(size):
        tried.append(size)
        return size <= edge

    assert search_batch_size(fits, limit=4096) == edge
    assert len(tried) <= 2 * math.log2(4096) + 2
    assert search_batch_size(lambda size: False, limit=64) == 0


def test_auto_batch_on_the_cpu_is_a_clear_error_and_safety_scales():
    from linnaeus.autobatch import apply_safety, find_batch_size
    from linnaeus.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.batch_size=auto .* set a number instead"):
        find_batch_size(lambda size: True, safety=0.9, limit=64, device=torch.device("cpu"))
    assert apply_safety(100, 0.9) == 90 and apply_safety(1, 0.5) == 1
    with pytest.raises(ConfigError, match="safety"):
        apply_safety(100, 1.5)


def test_no_masked_validation_pass_without_metadata():
    from linnaeus.evaluation import metadata_views

    assert metadata_views([]) == {"val": ()}
    assert metadata_views([], mask_each=["spatial"]) == {"val": ()}
    views = metadata_views(["spatial", "temporal"], mask_each=["spatial", "temporal"])
    assert views == {
        "val": (),
        "val_nometa": None,
        "val_no_spatial": ["spatial"],
        "val_no_temporal": ["temporal"],
    }


def test_grad_clip_function_returns_the_norm_and_clips_only_when_set():
    from linnaeus.run import build_grad_clip

    def params():
        p = nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([3.0, 4.0])
        return [p]

    unclipped = params()
    assert build_grad_clip(None)(unclipped).item() == pytest.approx(5.0)
    assert torch.equal(unclipped[0].grad, torch.tensor([3.0, 4.0]))
    clipped = params()
    assert build_grad_clip(1.0)(clipped).item() == pytest.approx(5.0)  # the norm before clipping
    assert clipped[0].grad.norm().item() == pytest.approx(1.0, rel=1e-4)
