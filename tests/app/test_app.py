"""The Hydra app: configs compose and instantiate, runs write results, sweeps report, bad configs
fail before training."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lightning_layerkd import LayerwiseLRCallback
from lightning_layerkd.app.report import collect, divergence_table, table
from lightning_layerkd.app.train import ConfigError, format_result, run
from lightning_layerkd.methods import DistillationMethod, method_names
from tests.helpers.coco import make_coco_fixture

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in (
        "dataset",
        "model",
        "method",
        "optimizer",
        "schedule",
        "callbacks",
        "trainer",
        "logger",
        "experiment",
    )
}
from tests.helpers.app import TINY, TINY_ANY_METHOD, config  # noqa: E402

# Kokane et al.'s presets; cifar100_standard is the distillation tables' recipe
PAPER_PRESETS = [p for p in GROUPS["experiment"] if p.endswith(("_table1", "_table2"))]


def write_arrays(folder: Path) -> Path:
    """A small generated image set in the arrays layout (uint8 HWC, 4 classes)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 48), ("test", 16)):
        np.save(folder / f"x_{split}.npy", rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
        np.save(folder / f"y_{split}.npy", np.arange(n) % 4)
    return folder


def test_groups_ship_the_paper_rows():
    # one config per registered method, named as registered, and the default preset
    assert GROUPS["method"] == sorted([*method_names(), "attention_logits"])
    assert GROUPS["optimizer"] == ["adamw", "sgd"]
    assert GROUPS["schedule"] == ["critical_period", "layerwise", "multistep", "none"]
    assert {"digits", "cifar10", "cifar100", "coco", "arrays"} <= set(GROUPS["dataset"])
    assert GROUPS["experiment"] == [
        "cifar100_standard",
        "cifar100_table1",
        "cifar10_table1",
        "coco_table2",
    ]


def test_defaults_are_the_best_measured_row():
    # RESULTS.md section 0: Jacobian matching (Srinivas & Fleuret eq. 10 on the output's input
    # Jacobian, the cross-entropy kept) at the constant schedule; the paper presets keep the
    # paper's row (attention maps, layer-wise rates)
    cfg = config()
    method = instantiate(cfg.method)
    assert type(method).__name__ == "JacobianMatching" and method.label == "jacobian_matching"
    assert (method.output_weight, method.activation_weight, method.norm_penalty_weight) == (1, 0, 0)
    assert (method.map_weight, method.task_loss, method.logit_weight) == (1.0, True, 0.0)
    assert cfg.schedule.name == "multistep" and cfg.schedule.layerwise is None
    cheap = instantiate(config("method=attention_logits").method)
    assert (cheap.label, cheap.logit_weight, cheap.temperature) == ("attention+logits", 1.0, 4.0)
    for preset in PAPER_PRESETS:
        paper = config(f"experiment={preset}")
        assert instantiate(paper.method).label == "attention"
        assert paper.schedule.name == "layerwise"
    chosen = config("experiment=cifar10_table1", "method=jacobian", "schedule=none")
    assert chosen.method._target_.endswith("JacobianMaps") and chosen.schedule.name == "none"


@pytest.mark.parametrize("option", GROUPS["dataset"])
def test_every_dataset_composes_and_instantiates(option, tmp_path):
    extra = []
    if option == "arrays":
        extra = [f"dataset.data_dir={write_arrays(tmp_path)}"]
    if option == "coco":
        ann, images = make_coco_fixture(tmp_path)
        extra = [f"dataset.annotation_file_{s}={ann}" for s in ("train", "val")]
        extra += [f"dataset.image_dir_{s}={images}" for s in ("train", "val")]
    datamodule = instantiate(config(f"dataset={option}", *extra).dataset)
    assert isinstance(datamodule, pl.LightningDataModule)


@pytest.mark.parametrize("option", GROUPS["model"])
def test_every_model_pair_composes_and_instantiates(option):
    cfg = config(f"model={option}")
    teacher = instantiate(cfg.model.teacher, num_classes=7)
    student = instantiate(cfg.model.student, num_classes=7)
    size = 64 if "coco" in option else 16
    with torch.no_grad():
        teacher.eval(), student.eval()
        assert student(torch.randn(1, 3, size, size)).shape == (1, 7)
    assert sum(p.numel() for p in teacher.parameters()) > sum(
        p.numel() for p in student.parameters()
    )


@pytest.mark.parametrize("option", GROUPS["schedule"])
def test_every_schedule_instantiates(option):
    cfg = config(f"schedule={option}")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if option == "none":
        assert cfg.schedule.scheduler is None and cfg.schedule.layerwise is None
        return
    if option == "critical_period":  # eq. 10's weights go to the information-flow method
        assert dict(cfg.method.critical_period) == {"alpha_init": 100.0, "gamma": 0.7}
    scheduler = instantiate(cfg.schedule.scheduler)(optimizer)
    assert list(scheduler.milestones) == list(cfg.milestones)
    if option == "layerwise":
        callback = instantiate(cfg.schedule.layerwise)
        assert isinstance(callback, LayerwiseLRCallback)
        assert callback.every_n_epochs == cfg.every_n_epochs and callback.gamma == 0.9


OBJECT_GROUPS = ("trainer", "logger", "method", "optimizer", "callbacks")


@pytest.mark.parametrize("option", [o for g in OBJECT_GROUPS for o in GROUPS[g]])
def test_trainer_logger_method_optimizer_callback_options_compose_and_build(option, tmp_path):
    """Every option of the object groups composes, and its _target_ nodes build the object
    the app would use: a method registered under the option's name, an optimizer over param
    groups, Lightning callbacks and loggers."""
    group = next(g for g in OBJECT_GROUPS if option in GROUPS[g])
    extra = ["logger.group=test"] if option == "wandb" else []  # no sweep dir outside hydra
    cfg = config(f"{group}={option}", f"output_dir={tmp_path}", *extra)
    if group == "trainer" and option == "cpu":
        pl.Trainer(**OmegaConf.to_container(cfg.trainer), logger=False)
    if group == "method":
        method = instantiate(cfg.method, _convert_="all")
        assert isinstance(method, DistillationMethod)
        assert method.label == {"attention_logits": "attention+logits"}.get(option, option)
    if group == "optimizer":
        groups = [{"params": [torch.zeros(2, requires_grad=True)], "name": "base"}]
        optimizer = instantiate(cfg.optimizer)(groups)
        assert optimizer.param_groups[0]["lr"] == cfg.lr
    if group == "callbacks":
        built = [instantiate(node) for node in cfg.callbacks.values()]
        assert all(isinstance(c, pl.Callback) for c in built)
    if group == "logger" and option == "csv":
        assert isinstance(instantiate(cfg.logger), pl.loggers.CSVLogger)
    if group == "logger" and option == "none":
        assert cfg.logger is None


@pytest.mark.parametrize("option", PAPER_PRESETS)
def test_experiment_presets_carry_the_paper_settings(option):
    cfg = config(f"experiment={option}")
    assert cfg.every_n_epochs == 25
    if option.startswith("cifar"):
        assert (cfg.epochs, list(cfg.milestones), cfg.lr_decay) == (200, [25, 35], 0.01)
        assert cfg.model.teacher.depth == 18 and cfg.model.student.depth == 10
    else:
        assert cfg.epochs == 100 and cfg.model.student._target_.endswith("resnet34")


def test_standard_recipe_preset_carries_the_tables_settings():
    cfg = config("experiment=cifar100_standard")
    assert (cfg.epochs, cfg.teacher_epochs, cfg.lr, cfg.weight_decay) == (240, 240, 0.05, 5e-4)
    assert (list(cfg.milestones), cfg.lr_decay, cfg.dataset.batch_size) == (
        [150, 180, 210],
        0.1,
        64,
    )
    assert cfg.dataset._target_.endswith("Cifar100DataModule") and cfg.optimizer.momentum == 0.9
    assert cfg.model.teacher._target_.endswith("resnet32x4")
    assert cfg.model.student._target_.endswith("resnet8x4")
    assert cfg.schedule.name == "multistep" and instantiate(cfg.method).label == "dkd"
    pairs = {
        "cifar_wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
        "cifar_resnet56_resnet20": ("resnet56", "resnet20"),
    }
    for pair, (teacher, student) in pairs.items():
        other = config("experiment=cifar100_standard", f"model={pair}").model
        assert other.teacher._target_ == f"lightning_layerkd.models.{teacher}"
        assert other.student._target_ == f"lightning_layerkd.models.{student}"


@pytest.mark.slow
def test_standard_recipe_preset_runs_one_short_epoch(tmp_path, cache):
    """The preset's networks (resnet32x4 -> resnet8x4) and recipe, on CPU, 48 8x8 images."""
    data = write_arrays(tmp_path / "data")
    overrides = (
        "experiment=cifar100_standard",
        "dataset=arrays",
        f"dataset.data_dir={data}",
        "trainer=cpu",
        "epochs=1",
        "teacher_epochs=1",
        "milestones=[1]",
        "limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
    )
    results = run(config(*overrides), tmp_path / "run")
    assert results["method"] == "dkd" and results["layer_pairs"] == []
    assert results["teacher"]["val_acc"] is not None and 0 <= results["student"]["val_acc"] <= 1


@pytest.mark.parametrize(
    "method",
    [
        "attention",
        "jacobian",
        "hessian",
        "jacobian_matching",
        "information_flow",
        "fitnet",
        "attention_transfer",
        "crd",
        "review_kd",
    ],
)
@pytest.mark.parametrize("schedule", ["none", "multistep", "layerwise"])
def test_digits_run_writes_results(method, schedule, tmp_path, shared_cache):
    cfg = config(*TINY, f"method={method}", f"schedule={schedule}")
    results = run(cfg, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["method"] == method and written["schedule"] == schedule
    assert written["layer_pairs"] == [
        ["layer1", "layer1"],
        ["layer2", "layer2"],
        ["layer3", "layer3"],
    ]  # 8x8 input: layer4 is 1x1
    assert 0 <= written["student"]["val_acc"] <= 1 and written["teacher"]["val_acc"] is not None
    assert [row["epoch"] for row in written["student"]["history"]] == [0, 1]
    lrs = written["final_lrs"]
    assert set(lrs) == {"layer1", "layer2", "layer3", "base"}
    if schedule == "none":
        assert all(lr == pytest.approx(cfg.lr) for lr in lrs.values())
    if schedule == "multistep":
        assert all(lr == pytest.approx(cfg.lr * cfg.lr_decay) for lr in lrs.values())
    if schedule == "layerwise":
        assert lrs["base"] == pytest.approx(cfg.lr * cfg.lr_decay)
        assert set(written["eta"]) == {"layer1", "layer2", "layer3"}
        assert lrs["layer1"] != pytest.approx(lrs["base"])
        # the default (relative) rule keeps every crucial rate within max_factor=4 of the base
        assert all(lrs["base"] / 4 <= lrs[n] <= 4 * lrs["base"] for n in written["eta"])
        assert written["layerwise"]["rule"] == "relative"
    if method == "information_flow":  # the auxiliary teacher: the student at twice the width
        assert written["auxiliary"]["width"] == 2 * cfg.model.student.width
        assert written["auxiliary"]["val_acc"] is not None
        matching = written["layer_matching"]
        assert set(matching["matching"]) == {"layer1", "layer2", "layer3", "output"}
        assert matching["matching"]["output"] == "output"  # eq. 4: last feeds last
        assert all(0 <= v <= 1 for v in matching["student"].values())
    else:
        assert written["auxiliary"] == {}
    assert "crucial layers" in format_result(results)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    # the method names its divergence; the metric keys and the report follow it
    names = {"information_flow": "pkt", "fitnet": "hint", "attention_transfer": "at"}
    names.update(crd="crd", review_kd="hcl")
    name = {"jacobian_matching": "jacobian_matching", **names}.get(method, "jsd")
    assert written["divergence_name"] == name
    assert f"val/{name}/layer1" in written["student"]["history"][-1]
    _, rows = divergence_table([written])
    assert [row[2:4] for row in rows] == [[name, f"layer{k}"] for k in (1, 2, 3)]


def test_logit_distillation_run_and_its_term_on_a_feature_method(tmp_path, shared_cache):
    """method=logits trains with one param group; logit_weight adds the term to attention."""
    results = run(config(*TINY, "method=logits", "schedule=multistep"), tmp_path / "a")
    assert results["method"] == "logits" and results["layer_pairs"] == []
    assert set(results["final_lrs"]) == {"base"} and results["teacher"]["val_acc"] is not None
    overrides = ("method.logit_weight=0.5", "logger=csv", "trainer.log_every_n_steps=1")
    results = run(config(*TINY, *overrides), tmp_path / "b")
    assert results["method_options"]["logit_weight"] == 0.5
    (metrics,) = (tmp_path / "b").rglob("metrics.csv")
    assert "train/logit_loss" in metrics.read_text().splitlines()[0]


def test_a_logit_loss_composes_with_a_feature_method_from_one_override(tmp_path, shared_cache):
    """method=attention method/logit_loss=dist: attention maps plus DIST, each term logged."""
    cfg = config("method=attention", "method/logit_loss=dkd", "method.logit_loss.standardize=true")
    method = instantiate(cfg.method)
    assert method.label == "attention+dkd+ls" and method.logit_term.beta == 8.0
    assert instantiate(config("method=dkd", "method.standardize=true").method).label == "dkd+ls"
    assert instantiate(config("method=dist").method).label == "dist"
    overrides = ("method/logit_loss=dist", "logger=csv", "trainer.log_every_n_steps=1")
    results = run(config(*TINY, *overrides), tmp_path)
    assert results["method"] == "attention+dist"
    assert results["method_options"]["logit_loss"]["_target_"].endswith("DISTLoss")
    (metrics,) = tmp_path.rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"train/dist_inter", "train/dist_intra", "train/map_loss"} <= set(header)


def test_teacher_is_trained_once_then_loaded_from_cache(tmp_path, cache):
    first = run(config(*TINY), tmp_path / "a")
    second = run(config(*TINY, "method=jacobian"), tmp_path / "b")
    assert first["teacher"]["cached"] is False and second["teacher"]["cached"] is True
    assert first["teacher"]["val_acc"] == second["teacher"]["val_acc"]
    assert len(list(cache.rglob("*.pt"))) == 1
    (weights,) = cache.rglob("*.pt")
    torch.save({"fc.weight": torch.zeros(1)}, weights)  # an incompatible checkpoint
    with pytest.raises(ValueError, match="does not fit the configured teacher"):
        run(config(*TINY), tmp_path / "c")


def test_student_alone_trains_no_teacher(tmp_path, cache):
    results = run(config(*TINY, "method=none", "schedule=multistep"), tmp_path)
    assert results["teacher"] == {} and results["layer_pairs"] == []
    assert list(cache.rglob("*.pt")) == []


# ---------------------------------------------------------------------- bad configs
def test_sweep_job_folders_are_numbered_not_named_after_overrides():
    """``num_override,override,...`` folder names pass 255 bytes in a Table 1 sweep on CIFAR
    and nest folders at every ``/`` of a data path; the job number is always a valid name."""
    with initialize_config_module(config_module="lightning_layerkd.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        config("method=fisher")
    assert "Available options in 'method'" in str(err.value)
    assert "jacobian" in str(err.value)


def test_missing_and_wrong_data_path(tmp_path, cache):
    arrays = [o for o in TINY if "image_size" not in o] + ["dataset=arrays"]
    with pytest.raises(ConfigError, match="data_dir") as err:
        run(config(*arrays), tmp_path)
    assert isinstance(err.value.__cause__, MissingMandatoryValue)
    with pytest.raises(ConfigError, match="x_train") as err:
        run(config(*arrays, f"dataset.data_dir={tmp_path}"), tmp_path)
    assert isinstance(err.value.__cause__, FileNotFoundError)


def test_every_n_epochs_beyond_epochs_fails_before_training(tmp_path, cache):
    with pytest.raises(ConfigError, match="every_n_epochs=5 is larger than epochs=2"):
        run(config(*TINY, "schedule=layerwise", "every_n_epochs=5"), tmp_path)
    assert list(cache.rglob("*.pt")) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=jacobian,method.wrt=foo", "method.wrt must be one of 'weight', 'activation', got"),
        ("method=hessian,method.num_probes=0", "num_probes must be at least 1"),
        ("method=hessian,method.teacher_probes=0", "teacher_probes must be at least 1"),
        ("schedule.layerwise.gamma=2", r"gamma must lie in \(0, 1\)"),
        ("schedule.layerwise.reduction=max", "schedule.layerwise.reduction must be one of 'sum'"),
        ("schedule.layerwise.reduction=mean", r"\['reduction'\] only apply to rule='paper'"),
        ("schedule.layerwise.rule=adam", "schedule.layerwise.rule must be one of 'relative', 'pa"),
        ("method=none", "schedule=layerwise needs crucial layers"),
        ("schedule=critical_period", "applies to method=information_flow only"),
        ("method=logits", "schedule=layerwise needs crucial layers, but method=logits"),
        ("method=information_flow,+method.alpha=2", r"\['alpha'\] are not options of Inf"),
        ("optimizer.momentum=-1", "invalid optimizer or schedule settings"),
        ("method=information_flow,model=coco_resnet50_resnet34", "has no 'width'"),
    ],
)
def test_method_and_schedule_mistakes_fail_before_the_teacher_trains(
    override, message, tmp_path, cache
):
    with pytest.raises(ConfigError, match=message):
        run(config(*TINY, "schedule=layerwise", *override.split(",")), tmp_path)
    assert list(cache.rglob("*.pt")) == []


def test_unknown_layers_fail_before_training_with_candidates(tmp_path, cache):
    with pytest.raises(ValueError) as err:
        run(config(*TINY, "layers=[[layer1,layer1],[layer9,layer2]]"), tmp_path)
    assert "student has no module 'layer9'" in str(err.value)
    assert "layer2  (2, 8, 4, 4)" in str(err.value)  # traced on two samples
    assert list(cache.rglob("*.pt")) == []


def test_arrays_dataset_runs_with_a_logger(tmp_path, shared_cache):
    # num_classes: null is resolved from the labels; the logger's hparams merge must agree
    cfg = config(
        *[o for o in TINY if "image_size" not in o and not o.startswith("logger=")],
        "logger=csv",
        "dataset=arrays",
        f"dataset.data_dir={write_arrays(tmp_path / 'data')}",
    )
    results = run(cfg, tmp_path / "out")
    assert results["student"]["val_acc"] is not None
    assert list((tmp_path / "out").rglob("hparams.yaml"))


# ---------------------------------------------------------------------- console scripts
@pytest.mark.slow
def test_multirun_and_report_console_scripts(tmp_path, cache):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "LAYERKD_CACHE": str(cache)}
    sweep = tmp_path / "sweep"
    subprocess.run(
        [
            str(bin_dir / "layerkd-train"),
            "-m",
            "method=attention,jacobian",
            "schedule=layerwise",
            *TINY_ANY_METHOD,  # the sweep's methods
            f"hydra.sweep.dir={sweep}",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert len(collect(sweep)) == 2
    report = subprocess.run(
        [str(bin_dir / "layerkd-report"), str(sweep)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "| Method | Learning Rate update | Digits |" in report.stdout
    assert "| Attention | Layerwise Update |" in report.stdout
    assert "| Jacobian | Layerwise Update |" in report.stdout
    assert (sweep / "table1.csv").exists()
    assert (sweep / "table1.md").read_text().startswith("| Method | Learning Rate update |")
    assert (sweep / "curves.png").read_bytes()[:4] == b"\x89PNG"
    runs = json.loads((sweep / "runs.json").read_text())
    assert sorted(r["method"] for r in runs) == ["attention", "jacobian"]
    assert all(not Path(r["_dir"]).is_absolute() for r in runs)


def test_report_reads_each_runs_divergence_name():
    def result(method, name, value, seed):
        history = [{"epoch": 1, "val/acc": 0.5, f"val/{name}/layer1": value}]
        return {
            "method": method,
            "schedule": "layerwise",
            "dataset": "D",
            "divergence_name": name,
            "student": {"val_acc": 0.5, "history": history},
        }

    runs = [result("information_flow", "pkt", 0.2, 0), result("information_flow", "pkt", 0.4, 1)]
    runs.append(result("my_method", "cosine", 0.01, 0))  # a user's method, after the built-ins
    header, rows = divergence_table(runs)
    assert header == ["Method", "Learning Rate update", "Divergence", "Layer", "D"]
    assert rows[0] == ["information_flow", "Layerwise Update", "pkt", "layer1", "0.3 ± 0.14 (n=2)"]
    assert rows[1] == ["my_method", "Layerwise Update", "cosine", "layer1", "0.01"]


def test_report_table_means_and_stds_over_seeds():
    def result(method, schedule, acc, seed):
        return {
            "method": method,
            "schedule": schedule,
            "dataset": "D",
            "config": {"seed": seed},
            "student": {"val_acc": acc, "history": []},
            "teacher": {"val_acc": 0.9, "key": "k"},
        }

    runs = [
        result("jacobian", "layerwise", 0.5, 0),
        result("jacobian", "layerwise", 0.7, 1),
        result("jacobian", "none", 0.4, 0),
    ]
    header, rows = table(runs)
    assert header == ["Method", "Learning Rate update", "D"]
    assert rows[0] == ["Jacobian", "None", "40.00"]
    assert rows[1] == ["", "Layerwise Update", "60.00 ± 14.14 (n=2)"]
    assert rows[-1] == ["Teacher", "", "90.00"]

    # attention maps with and without logit KD are two rows (results.json names them apart),
    # in the registry's order, the student alone last
    runs = [
        result("jacobian", "multistep", 0.5, 0),
        result("none", "multistep", 0.2, 0),
        result("attention+logits", "multistep", 0.8, 0),
        result("attention", "multistep", 0.6, 0),
    ]
    _, rows = table(runs)
    assert [row[0] for row in rows] == [
        "Attention",
        "Attention + Logits",
        "Jacobian",
        "Student alone",
        "Teacher",
    ]
    assert [row[2] for row in rows[:2]] == ["60.00", "80.00"]


def test_wandb_logger_runs_offline_with_panels_and_map_images(tmp_path, shared_cache, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc credentials
    cfg = config(
        *TINY[:-1],
        "logger=wandb",
        "schedule=layerwise",  # its panels
        "callbacks.map_images.every_n_epochs=1",
        "logger.group=test",
    )
    run(cfg, tmp_path / "out")
    assert os.environ["WANDB_MODE"] == "offline"
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    images = sorted(p.name.split("_")[0] for p in (media / "images" / "maps").glob("*.png"))
    assert {"layer1", "layer2", "layer3"} <= set(images)
    panels = media / "table" / "panels"
    charts = {str(p.relative_to(panels)).rsplit("_table", 1)[0] for p in panels.rglob("*.json")}
    expected = {"layerwise/lr", "layerwise/eta", "layerwise/divergence", "layerwise/factor"}
    assert expected | {"train/jsd"} <= charts


@pytest.mark.slow
def test_ddp_run_trains_the_teacher_once_and_both_ranks_agree(tmp_path, cache):
    """strategy=ddp re-runs the script for rank 1 while rank 0 holds the teacher-cache lock."""
    out = tmp_path / "run"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "layerkd-train"),
            *TINY,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            f"hydra.run.dir={out}",
        ],
        check=True,
        env={**os.environ, "LAYERKD_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["student"]["val_acc"] is not None
    assert len(list(cache.rglob("*.pt"))) == 1


# ---------------------------------------------------------------------- the teacher cache
# the teacher alone matters here: one student epoch
ONE_EPOCH = [*TINY, "epochs=1"]


def test_teacher_cache_key_covers_the_data_and_the_precision():
    from lightning_layerkd.app.teacher import teacher_cache_key

    cfg = config(*TINY)
    key = teacher_cache_key(cfg, {})
    assert key == teacher_cache_key(config(*TINY), {})  # stable for the same data and config
    assert key == teacher_cache_key(config(*TINY, "logger=csv", "epochs=3"), {})  # student only
    assert teacher_cache_key(cfg, {"x_train.npy": {"sha256": "a"}}) != key
    assert teacher_cache_key(cfg, {"a": 1, "b": 2}) == teacher_cache_key(cfg, {"b": 2, "a": 1})
    assert teacher_cache_key(config(*TINY, "trainer.precision=64-true"), {}) != key
    assert teacher_cache_key(config(*TINY, "trainer.precision=bf16-mixed"), {}) != key
    # Lightning's aliases of one precision are one teacher
    assert teacher_cache_key(config(*TINY, "trainer.precision=32"), {}) == key
    with pytest.raises(TypeError, match="JSON"):
        teacher_cache_key(cfg, {"path": Path("/data")})


def test_teacher_cache_tells_arrays_folders_apart_by_their_content(tmp_path, cache):
    """Two folders of the same shape but other pixels train two teachers (the key holds the
    datamodule's data_fingerprint()); the same files in another folder reuse the first."""
    import shutil

    first = write_arrays(tmp_path / "first")
    other = shutil.copytree(first, tmp_path / "other")
    for split in ("train", "test"):
        np.save(other / f"x_{split}.npy", 255 - np.load(first / f"x_{split}.npy"))
    moved = shutil.copytree(first, tmp_path / "elsewhere" / "first")
    arrays = [o for o in ONE_EPOCH if "image_size" not in o] + ["dataset=arrays"]

    def teacher(folder: Path) -> dict:
        cfg = config(*arrays, f"dataset.data_dir={folder}")
        return run(cfg, tmp_path / "runs" / folder.relative_to(tmp_path))["teacher"]

    assert teacher(first)["cached"] is False
    assert teacher(other)["cached"] is False
    assert len(list(cache.rglob("*.pt"))) == 2
    assert teacher(moved)["cached"] is True
    assert len(list(cache.rglob("*.pt"))) == 2


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.suffix in (".pt", ".json"))


def test_a_diverged_teacher_is_an_error_and_never_cached(tmp_path, cache, monkeypatch):
    from lightning_layerkd.app.teacher import TeacherTrainingError

    fit = pl.Trainer.fit

    def poisoned_fit(self, module, *args, **kwargs):
        fit(self, module, *args, **kwargs)
        with torch.no_grad():  # as if the last step had diverged
            next(module.parameters()).fill_(float("nan"))

    monkeypatch.setattr(pl.Trainer, "fit", poisoned_fit)
    with pytest.raises(TeacherTrainingError, match=r"non-finite.*lower lr.*check the data"):
        run(config(*ONE_EPOCH), tmp_path / "a")
    assert _entries(cache) == []


def test_a_teacher_whose_outputs_overflow_is_an_error_and_never_cached(tmp_path, cache):
    """lr=1e4 blows the teacher's weights up until its logits overflow (validation loss NaN)."""
    from lightning_layerkd.app.teacher import TeacherTrainingError

    with pytest.raises(TeacherTrainingError, match="lower lr"):
        run(config(*ONE_EPOCH, "lr=1e4"), tmp_path)
    assert _entries(cache) == []


def test_a_teacher_without_validation_accuracy_is_an_error_and_never_cached(
    tmp_path, cache, monkeypatch
):
    from lightning_layerkd.app.teacher import TeacherTrainingError

    # limit_val_batches=0 is refused before training (no validation, no accuracy) ...
    with pytest.raises(ConfigError, match="limit_val_batches=0 .* leaves no batches"):
        run(config(*ONE_EPOCH, "limit_val_batches=0"), tmp_path)
    assert _entries(cache) == []
    # ... and a teacher whose validation still yields no accuracy is never cached
    monkeypatch.setattr("lightning_layerkd.app.checks.check_values", lambda cfg: None)
    with pytest.raises(TeacherTrainingError, match="no validation accuracy.*limit_val_batches"):
        run(config(*ONE_EPOCH, "limit_val_batches=0"), tmp_path / "again")
    assert _entries(cache) == []


@pytest.fixture(scope="module")
def good_teacher_entry(tmp_path_factory) -> dict[str, bytes]:
    """The files of one cached ONE_EPOCH teacher: {file name: bytes}."""
    root = tmp_path_factory.mktemp("good-teacher")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAYERKD_CACHE", str(root / "cache"))
        run(config(*ONE_EPOCH), root / "run")
    files = (root / "cache" / "teachers").glob("*")
    return {p.name: p.read_bytes() for p in files if p.suffix in (".pt", ".json")}


def _install(entry: dict[str, bytes], cache: Path) -> tuple[Path, Path]:
    """Write ``entry`` into ``cache`` where the app looks for it; returns (weights, meta)."""
    teachers = cache / "teachers"
    teachers.mkdir(parents=True, exist_ok=True)
    for name, data in entry.items():
        (teachers / name).write_bytes(data)
    (weights,) = teachers.glob("*.pt")
    return weights, weights.with_suffix(".json")


def _nan_weights(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, path)


CORRUPTIONS = {
    "truncated weights": (".pt", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "garbage weights": (".pt", lambda p: p.write_bytes(b"\x00garbage" * 100)),
    "empty weights": (".pt", lambda p: p.write_bytes(b"")),
    "not a state dict": (".pt", lambda p: torch.save([1, 2, 3], p)),
    "non-finite weights": (".pt", _nan_weights),
    "invalid json": (".json", lambda p: p.write_text('{"key": "resnet18w8-res')),
    "json without val_acc": (".json", lambda p: p.write_text('{"val_acc": NaN}')),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_cache_entry_is_moved_aside_and_the_teacher_retrained(
    corruption, good_teacher_entry, tmp_path, cache, caplog
):
    caplog.set_level(logging.INFO, logger="lightning_layerkd.app")
    weights, meta = _install(good_teacher_entry, cache)
    suffix, corrupt = CORRUPTIONS[corruption]
    bad = weights if suffix == ".pt" else meta
    corrupt(bad)
    results = run(config(*ONE_EPOCH), tmp_path / "a")
    out = caplog.text
    assert results["teacher"]["cached"] is False
    (aside,) = bad.parent.glob(f"{bad.name}.corrupt-*")
    assert f"{bad}" in out and aside.name in out and "retraining" in out
    assert json.loads(meta.read_text())["val_acc"] is not None
    assert torch.load(weights, weights_only=True).keys()  # a sound entry again
    assert run(config(*ONE_EPOCH), tmp_path / "b")["teacher"]["cached"] is True


def test_the_teacher_lock_holds_the_holders_pid(tmp_path):
    from lightning_layerkd.app.teacher import _locked

    lock = tmp_path / "t.lock"
    with _locked(lock, tmp_path / "t.pt"):
        assert lock.read_text().strip() == str(os.getpid())


def test_a_job_waiting_for_the_teacher_says_whom_it_waits_for_then_loads_it(
    good_teacher_entry, tmp_path, cache, caplog, monkeypatch
):
    """Another job (here a thread with PID 4242 in the lock file) trains the teacher; this job
    waits for the lock, says so once, then loads the teacher that job cached."""
    import fcntl
    import threading

    teachers = cache / "teachers"
    teachers.mkdir()
    (name,) = [n for n in good_teacher_entry if n.endswith(".pt")]
    weights = teachers / name
    handle = open(weights.with_suffix(".lock"), "w")  # noqa: SIM115 - closed by the holder
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write("4242\n")
    handle.flush()
    blocked = threading.Event()
    flock = fcntl.flock

    def observed_flock(fd, operation):
        if operation == fcntl.LOCK_EX:  # a blocking request: the job now waits
            blocked.set()
        return flock(fd, operation)

    def other_job():
        blocked.wait(timeout=120)
        _install(good_teacher_entry, cache)  # its teacher, cached before it lets go
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    monkeypatch.setattr(fcntl, "flock", observed_flock)
    caplog.set_level(logging.INFO, logger="lightning_layerkd.app")
    holder = threading.Thread(target=other_job)
    holder.start()
    try:
        results = run(config(*ONE_EPOCH), tmp_path)
    finally:
        blocked.set()
        holder.join()
    out = caplog.text
    message = f"waiting for the teacher being trained by PID 4242 at {weights}"
    assert out.count(message) == 1
    assert results["teacher"]["cached"] is True
    assert out.index(message) < out.index(f"teacher loaded from cache {weights}")


def test_leftover_temporary_files_of_a_killed_run_are_removed(
    good_teacher_entry, tmp_path, cache, caplog
):
    caplog.set_level(logging.INFO, logger="lightning_layerkd.app")
    weights, _ = _install(good_teacher_entry, cache)
    leftovers = [weights.with_name(f".{weights.stem}.{s}.99999.tmp") for s in ("pt", "json")]
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    assert run(config(*ONE_EPOCH), tmp_path)["teacher"]["cached"] is True
    out = caplog.text
    assert not any(p.exists() for p in leftovers)
    assert all(f"removed {p}, left by a run killed" in out for p in leftovers)


def test_atomic_write_leaves_the_old_file_and_no_temporary_one_when_writing_fails(tmp_path):
    from lightning_layerkd.app.teacher import atomic_write

    target = tmp_path / "results.json"
    target.write_text("old")

    def fails(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == [target.name]
