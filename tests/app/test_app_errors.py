"""``layerkd-train`` and ``layerkd-report`` as a careless user meets them: mistakes fail before
training with the key and the fix (exit status 2, no traceback), a run that cannot learn stops
(status 1), and a report never mixes two sweeps."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lightning_layerkd.app.report import collect
from lightning_layerkd.app.report import main as report_main
from lightning_layerkd.app.runs import run_dir_lock
from lightning_layerkd.app.train import ConfigError, run
from lightning_layerkd.guards import NonFiniteLossError
from tests.helpers.app import TINY, TINY_ANY_METHOD, config
from tests.helpers.coco import make_coco_fixture


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("layers=layer1", r"layers='layer1' is not a layer list .*layers=\[layer1,layer2\]"),
        ("layers=[[layer1,layer1,layer2]]", r"is not a layer list .*\[student, teacher\] pairs"),
        ("layers=[layer9]", r"layers: student has no module 'layer9'"),
        ("epochs=abc", r"epochs must be an integer, got 'abc'"),
        ("every_n_epochs=1.5", r"every_n_epochs must be an integer, got 1.5"),
        ("milestones=[1,5]", r"milestones \[5\] lie outside epochs 1..2; .*leave milestones unset"),
    ],
)
def test_config_mistakes_name_the_key_and_the_fix(override, message, tmp_path, cache):
    with pytest.raises(ConfigError, match=message):
        run(config(*TINY, override), tmp_path)
    assert list(cache.rglob("*.pt")) == []


def test_an_empty_layer_list_is_for_methods_that_allow_it():
    """layers=[] is Jacobian matching's output term alone; a map method needs a layer."""
    from lightning_layerkd.app.checks import check_config

    check_config(config(*TINY_ANY_METHOD, "method=jacobian_matching", "layers=[]"))
    with pytest.raises(ConfigError, match=r"layers=\[\] is not a layer list \(layers is empty"):
        check_config(config(*TINY, "layers=[]"))


def test_jacobian_matching_on_the_output_alone_runs(tmp_path, shared_cache):
    results = run(config(*TINY_ANY_METHOD, "method=jacobian_matching", "layers=[]"), tmp_path)
    assert results["layer_pairs"] == []
    assert results["student"]["val_acc"] is not None


def test_a_list_of_paths_pairs_each_with_itself(tmp_path, shared_cache):
    results = run(config(*TINY, "layers=[layer1,layer2]"), tmp_path)
    assert results["layer_pairs"] == [("layer1", "layer1"), ("layer2", "layer2")]


def test_epochs_alone_derives_the_milestones(tmp_path, shared_cache):
    """epochs=2 with the default milestones (half and three quarters of epochs) runs."""
    overrides = [o for o in TINY if not o.startswith("milestones=")]
    cfg = config(*overrides)
    assert list(cfg.milestones) == [1, 2] and list(config("epochs=8").milestones) == [4, 6]
    assert run(cfg, tmp_path)["student"]["val_acc"] is not None


def test_data_mistakes_are_config_errors_naming_the_path(tmp_path, cache):
    arrays = [o for o in TINY if "image_size" not in o] + ["dataset=arrays"]
    with pytest.raises(ConfigError, match="data_dir"):
        run(config(*arrays), tmp_path)
    with pytest.raises(ConfigError, match=f"no image arrays in {tmp_path}"):
        run(config(*arrays, f"dataset.data_dir={tmp_path}"), tmp_path)


def test_a_diverging_run_stops_and_caches_no_teacher(tmp_path, cache):
    from lightning_layerkd.app.teacher import TeacherTrainingError

    # where the divergence is caught depends on the CPU's kernels: a non-finite loss during a
    # step, or non-finite weights after the last step; both stop the run with the fix
    with pytest.raises((NonFiniteLossError, TeacherTrainingError), match="lower lr"):
        run(config(*TINY, "lr=1e6"), tmp_path)
    assert list(cache.rglob("*.pt")) == [] and not (tmp_path / "results.json").exists()


def test_command_line_mistake_exits_2_with_the_message_only(tmp_path, cache):
    out = subprocess.run(
        [sys.executable, "-m", "lightning_layerkd.app.train", *TINY, "layers=layer1"],
        capture_output=True,
        text=True,
        env={**os.environ, "LAYERKD_CACHE": str(cache)},
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "layerkd-train: error: layers='layer1' is not a layer list" in out.stderr
    assert "Traceback" not in out.stderr


def _result(folder: Path, sweep_id: str, seed: int, acc: float, sweep_dir: str = "x") -> None:
    folder.mkdir(parents=True)
    result = {
        "method": "attention",
        "schedule": "layerwise",
        "dataset": "D",
        "config": {"seed": seed},
        "student": {"val_acc": acc, "history": []},
        "sweep": {"dir": sweep_dir, "id": sweep_id, "overrides": [f"seed={seed}"]},
    }
    (folder / "results.json").write_text(json.dumps(result))


def test_report_refuses_a_directory_with_two_sweeps(tmp_path, capsys):
    """A sweep dir reused by a smaller sweep keeps the old sweep's extra jobs: the report names
    both sweeps instead of averaging them; --sweep picks one."""
    _result(tmp_path / "0", "new", 0, 0.5)
    _result(tmp_path / "1", "old", 1, 0.9)  # left over from the earlier, larger sweep
    with pytest.raises(ValueError, match=r"(?s)directory x holds runs of 2 .*--sweep new: 1 runs"):
        collect(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path)])
    assert exit_info.value.code == 2 and "--sweep old" in capsys.readouterr().err
    assert [r["config"]["seed"] for r in collect(tmp_path, "new")] == [0]
    # separate sweeps in separate directories (e.g. the distilled grid and the student alone)
    _result(tmp_path / "student" / "0", "alone", 0, 0.4, sweep_dir="y")
    assert len(collect(tmp_path, "alone")) == 1
    (tmp_path / "1" / "results.json").unlink()
    assert sorted(r["sweep"]["id"] for r in collect(tmp_path)) == ["alone", "new"]


# ---------------------------------------------------------------------- one job per run dir
LAYERKD_TRAIN = str(Path(sys.executable).parent / "layerkd-train")


def test_a_second_job_into_a_busy_run_directory_is_refused_with_the_holders_pid(tmp_path, cache):
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):  # this process stands for the first job
        with pytest.raises(ConfigError) as err:
            run(config(*TINY), run_dir)
        out = subprocess.run(
            [LAYERKD_TRAIN, *TINY, f"hydra.run.dir={run_dir}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    message = (
        f"the run directory {run_dir} is in use by another layerkd-train job (PID {os.getpid()}); "
        "wait for it to end, or choose another hydra.run.dir"
    )
    assert str(err.value).startswith(message)
    assert out.returncode == 2 and f"layerkd-train: error: {message}" in out.stderr
    assert "Traceback" not in out.stderr
    assert not {"checkpoints", "teacher", "results.json"} & {p.name for p in run_dir.iterdir()}
    assert list(cache.rglob("*.pt")) == []


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its content and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True])
def test_a_job_refused_for_a_busy_directory_writes_nothing_there(tmp_path, cache, sweep):
    """The holder's ``.hydra/`` files, ``train.log`` and (a sweep's) ``multirun.yaml`` are left
    as they were by a second job (or sweep) into its directory, which exits 2 (Hydra wrote
    them before the refusal; ``layerkd-report`` then listed a phantom job)."""
    busy = tmp_path / "busy"
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "multirun.yaml"):
        (busy / name).parent.mkdir(parents=True, exist_ok=True)
        (busy / name).write_text(f"the holder's {name}\n")
    option = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    command = [LAYERKD_TRAIN, *(["-m", "seed=0,1"] if sweep else []), *TINY, f"{option}={busy}"]
    with run_dir_lock(busy, option=option):  # this process stands for the holder
        before = snapshot(busy)
        out = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert snapshot(busy) == before
    kind = "sweep" if sweep else "run"
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        f"layerkd-train: error: the {kind} directory {busy} is in use by another layerkd-train "
        f"job (PID {os.getpid()}); wait for it to end, or choose another {option}"
    ) in out.stderr
    assert "Traceback" not in out.stderr
    assert list(cache.rglob("*.pt")) == []


def test_two_jobs_started_in_the_same_second_get_their_own_run_directories(tmp_path, cache):
    """The default hydra.run.dir: two jobs started together (each stopping at a config
    mistake, after Hydra made its directory) never share one."""
    jobs = [
        subprocess.Popen(
            [LAYERKD_TRAIN, "epochs=abc"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for job in jobs:
        assert job.wait(timeout=300) == 2, job.stderr.read()
        job.stderr.close()
    (day,) = (tmp_path / "outputs").iterdir()
    assert len(list(day.iterdir())) == 2


# ---------------------------------------------------------------------- the teacher cache
def test_the_teacher_cache_key_holds_every_option_of_the_teachers_trainer_and_optimizer(
    monkeypatch, tmp_path
):
    """Whatever build_trainer passes to the teacher's Trainer (but where it writes, its
    callbacks and display options) is in the key's payload with the same value, and so is the
    optimizer the teacher is built with: a setting added to either but not to the key fails."""
    import lightning.pytorch as pl

    from lightning_layerkd.app import teacher as stage1
    from lightning_layerkd.app.cache_key import DISPLAY_ONLY, teacher_cache_payload

    cfg = config(*TINY, "+trainer.accumulate_grad_batches=3", "+trainer.gradient_clip_val=0.001")
    passed: dict = {}
    monkeypatch.setattr(pl, "Trainer", lambda **kwargs: passed.update(kwargs))
    stage1.build_trainer(cfg, cfg.teacher_epochs, tmp_path, [], False)
    payload = teacher_cache_payload(cfg, {})
    wiring = {"default_root_dir", "callbacks", "logger", *DISPLAY_ONLY}
    wiring.add("plugins")  # how checkpoints are written (with their checksum), not what trains
    assert {k: v for k, v in passed.items() if k not in wiring} == payload["trainer"]
    assert payload["trainer"]["accumulate_grad_batches"] == 3
    assert payload["optimizer"] == OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert payload["scheduler"] == OmegaConf.to_container(cfg.teacher_scheduler, resolve=True)


@pytest.mark.parametrize(
    ("override", "changes"),
    [
        ("+trainer.accumulate_grad_batches=3", True),
        ("+trainer.gradient_clip_val=0.001", True),
        ("trainer.deterministic=true", True),
        ("+trainer.max_steps=5", True),
        ("limit_train_batches=4", True),
        ("limit_val_batches=3", True),
        ("lr=0.02", True),
        ("weight_decay=0", True),
        ("lr_decay=0.5", True),
        ("optimizer=adamw", True),
        ("teacher_epochs=2", True),
        ("seed=1", True),
        ("dataset.image_size=16", True),
        ("trainer.enable_progress_bar=true", False),
        ("trainer.log_every_n_steps=1", False),
        ("epochs=3", False),
        ("method=jacobian", False),
        ("logger=csv", False),
    ],
)
def test_the_teacher_cache_key_changes_with_the_teachers_training_only(override, changes):
    from lightning_layerkd.app.teacher import teacher_cache_key

    key = teacher_cache_key(config(*TINY), {})
    assert (teacher_cache_key(config(*TINY, override), {}) != key) is changes


def test_an_unusable_cache_location_names_layerkd_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LAYERKD_CACHE", str(blocker))
    with pytest.raises(ConfigError) as err:
        run(config(*TINY), tmp_path / "run")
    assert str(err.value) == (
        f"the teacher cache {blocker / 'teachers'} cannot be used as a folder (Not a "
        f"directory: {blocker / 'teachers'}); set LAYERKD_CACHE (the cache is "
        "$LAYERKD_CACHE/teachers) or teacher_cache_dir=<folder> to a writable folder"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_read_only_cache_that_holds_the_teacher_is_read_without_a_lock(
    tmp_path, cache, monkeypatch
):
    """A read-only cache (os.access says so, as for a read-only mount or folder): its teacher is
    loaded, nothing is locked or written there; without the teacher it is a clear error."""
    from lightning_layerkd.app import teacher as stage1

    first = run(config(*TINY), tmp_path / "first")
    teachers = cache / "teachers"
    listing = sorted(p.name for p in teachers.iterdir())
    real_access = os.access
    monkeypatch.setattr(
        stage1.os,
        "access",
        lambda path, mode: (
            not (Path(path) == teachers and mode & os.W_OK) and real_access(path, mode)
        ),
    )

    def no_lock(*args):
        raise AssertionError("the read-only cache was locked")

    monkeypatch.setattr(stage1, "_locked", no_lock)
    again = run(config(*TINY), tmp_path / "again")
    assert again["teacher"]["cached"] is True and again["teacher"]["key"] == first["teacher"]["key"]
    assert sorted(p.name for p in teachers.iterdir()) == listing
    with pytest.raises(ConfigError, match=r"is not writable and holds no teacher for this run"):
        run(config(*TINY, "seed=1"), tmp_path / "other")


# ---------------------------------------------------------------------- values and keys
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=0", "lr must be finite and greater than 0, got 0: e.g. lr=0.05"),
        ("lr=abc", "lr must be a number, got 'abc': e.g. lr=0.05"),
        ("lr=nan", "lr must be finite and greater than 0, got nan: e.g. lr=0.05"),
        ("lr_decay=-1", "lr_decay must lie in (0, 1] (the factor MultiStepLR multiplies"),
        ("lr_decay=0", "lr_decay must lie in (0, 1]"),
        ("map_weight=nan", "map_weight must be finite and non-negative, got nan"),
        ("map_weight=-1", "map_weight must be finite and non-negative, got -1"),
        ("method=logits schedule=none", None),  # its logit weight is checked: fine by default
        ("weight_decay=-1", "weight_decay must be finite and non-negative, got -1"),
        (
            "limit_train_batches=0",
            "limit_train_batches=0 is neither a number of batches (at least 1) nor a fraction in "
            "(0, 1] and leaves no batches: e.g. limit_train_batches=10",
        ),
        ("limit_val_batches=1.5", "limit_val_batches=1.5 is neither a number of batches"),
        ("+mthod=jacobian", "unknown key 'mthod' (set with mthod=... or +mthod=...): did you "),
        ("trainer.precision=bogus", "trainer settings: Precision 'bogus' is invalid."),
        # every float of every group is finite (was: trains, caches the teacher, then NaN)
        ("method.temperature=nan", "method.temperature must be finite and greater than 0, got n"),
        ("method.temperature=-inf", "method.temperature must be finite and greater than 0, got -"),
        (
            "schedule=layerwise schedule.layerwise.power=inf",
            "schedule.layerwise.power must be a finite number, got inf",
        ),
        ("+trainer.gradient_clip_val=nan", "trainer.gradient_clip_val must be a finite number"),
        # types from the method's signature, ranges from its constructor, the key named
        ("method.temperature=abc", "method.temperature must be a number, got 'abc'"),
        ("method.task_loss=3", "method.task_loss must be true or false, got 3"),
        # every object the config builds: its options against its signature, the key named
        ("model.student.width=abc", "model.student.width must be an integer, got 'abc'"),
        ("dataset.batch_size=1.5", "dataset.batch_size must be an integer, got 1.5"),
        ("optimizer.momentum=abc", "optimizer.momentum must be a number, got 'abc'"),
        (
            "schedule=layerwise schedule.layerwise.gamma=abc",
            "schedule.layerwise.gamma must be a number, got 'abc'",
        ),
        # a configuration that trains nothing, a cache that is nowhere
        (
            "method.task_loss=false map_weight=0",
            "every loss term of method=attention is zero (method.task_loss=false, "
            "method.map_weight=0, method.logit_weight=0): nothing would train",
        ),
        (
            "method=jacobian_matching method.task_loss=false method.output_weight=0",
            "every loss term of method=jacobian_matching is zero (method.task_loss=false, "
            "method.output_weight=0, method.activation_weight=0, method.norm_penalty_weight=0, "
            "method.map_weight=1, method.logit_weight=0)",
        ),
        ("method.task_loss=false", None),  # the maps alone: fine
        ("method.task_loss=false map_weight=0 method.logit_weight=0.5", None),  # logit KD
        ("teacher_cache_dir=''", "teacher_cache_dir is empty: set it to a folder"),
        ("method.temperature=-1", "method.temperature must be finite and greater than 0, got -1"),
        (
            "method=jacobian method.weight_alignment=1",
            "method.weight_alignment must be one of 'sorted', 'index', got 1",
        ),
    ],
)
def test_values_that_train_nothing_and_unknown_keys_are_refused(override, message, tmp_path):
    from lightning_layerkd.app.checks import check_config

    if message is None:
        check_config(config(*TINY, *override.split()))
        return
    with pytest.raises(ConfigError) as err:
        check_config(config(*TINY, *override.split()))
    assert str(err.value).startswith(message)


def test_method_logit_weight_is_checked(tmp_path):
    from lightning_layerkd.app.checks import check_config

    with pytest.raises(ConfigError, match=r"^method.logit_weight must be finite and non-negat"):
        check_config(config(*TINY, "method=logits", "schedule=none", "method.logit_weight=-0.5"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("method/logit_loss=dkd", "method.logit_loss.beta=-1"),
            "method.logit_loss.beta must be finite and non-negative",
        ),
        (
            ("method/logit_loss=dist", "method.logit_loss.temperature=0"),
            "method.logit_loss.temperature must be finite and greater than 0",
        ),
        (("method=dkd", "method.alpha=-0.5"), "method.alpha must be finite and non-negative"),
        (("method=dist", "method.temperature=0"), "method.temperature must be finite and greater"),
        (
            ("method=dkd", "method/logit_loss=dist"),
            "method options ['logit_loss'] are not options of DecoupledKD",
        ),
        (
            ("method=attention_logits", "method/logit_loss=dkd"),
            "invalid method settings: method.logit_weight: AttentionMaps: logit_weight=1.0",
        ),
        (
            ("method/logit_loss=dkd", "method.logit_loss.warmup_epochs=-2"),
            "invalid method settings: method.logit_loss.warmup_epochs: DKDLoss: warmup_epochs",
        ),
    ],
)
def test_bad_logit_loss_options_are_refused_by_name(overrides, message):
    from lightning_layerkd.app.checks import check_config

    with pytest.raises(ConfigError) as err:
        check_config(config(*TINY, "schedule=none", *overrides))
    assert str(err.value).startswith(message)
    if "attention_logits" in overrides:
        assert "both add a logit loss" in str(err.value)
    if "method.logit_loss.warmup_epochs=-2" in overrides:
        assert "warmup_epochs must be >= 0, got -2" in str(err.value)


@pytest.mark.parametrize("overrides", [("method=dkd",), ("method/logit_loss=dist",)])
def test_a_multiclass_logit_loss_on_multilabel_data_fails_before_the_teacher(
    overrides, tmp_path, cache
):
    ann, images = make_coco_fixture(tmp_path)
    coco = ["dataset=coco", *(f"dataset.annotation_file_{s}={ann}" for s in ("train", "val"))]
    coco += [f"dataset.image_dir_{s}={images}" for s in ("train", "val")]
    with pytest.raises(ConfigError, match="^method and dataset: .* not 'multilabel'"):
        run(config(*TINY, "schedule=none", *coco, *overrides), tmp_path / "run")
    assert not list(cache.rglob("*.pt"))  # no teacher was trained


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["lr=0"], "layerkd-train: error: lr must be finite and greater than 0, got 0"),
        (["method.temperature=nan"], "error: method.temperature must be finite and greater"),
        (["+mthod=jacobian"], "layerkd-train: error: unknown key 'mthod'"),
        (["mthod=jacobian"], "Could not override 'mthod'"),  # Hydra's own, now status 2
        (["method=fisher"], "Could not find 'method/fisher'"),
        (["method.wrt=weight"], "Could not override 'method.wrt'"),
    ],
)
def test_command_line_value_and_key_mistakes_exit_2_without_a_traceback(
    overrides, says, tmp_path, cache
):
    out = subprocess.run(
        [LAYERKD_TRAIN, *TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert says in out.stderr and "Traceback" not in out.stderr
    assert list(cache.rglob("*.pt")) == []


# ---------------------------------------------------------------------- the report's gaps
def test_the_report_names_every_gap_and_writes_only_to_out(tmp_path, capsys):
    """A sweep of four jobs: one reported, one results.json of ``{}``, one truncated, one job
    that never ran. The table holds the one, and the three others are named (on stderr and
    under the table) with what to do; with --out nothing is written into the sweep folder."""
    sweep = tmp_path / "sweep"
    _result(sweep / "0", "s", 0, 0.5)
    (sweep / "1").mkdir()
    (sweep / "1" / "results.json").write_text("{}")
    (sweep / "2").mkdir()
    (sweep / "2" / "results.json").write_text('{"method": "atten')
    spec = {"hydra": {"sweeper": {}, "overrides": {"task": ["seed=0,1,2,3", "epochs=2"]}}}
    OmegaConf.save(OmegaConf.create(spec), sweep / "multirun.yaml")
    before = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    report_main([str(sweep), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"layerkd-report: warning: {sweep / '1' / 'results.json'}: malformed, no method, "
        "schedule, dataset, student; rerun or resume that run",
        f"layerkd-report: warning: {sweep / '2' / 'results.json'}: unreadable "
        "(JSONDecodeError: Unterminated string starting at: line 1 column 12 (char 11)); rerun "
        "or resume that run",
        f"layerkd-report: warning: {sweep / '3'}: sweep job 3 has no results.json, it never "
        f"ran; run it: layerkd-train seed=3 epochs=2 hydra.run.dir={sweep / '3'}",
    ]
    table = (tmp_path / "out" / "table1.md").read_text()
    assert "Not in this table (3):" in table and f"- {sweep / '3'}: sweep job 3" in table
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == before
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stop:
        report_main([str(sweep), "--out", str(blocker / "out")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"cannot write the report into {blocker / 'out'} (Not a directory: {blocker / 'out'}); "
        "pass --out <a writable folder>\n"
    )


def test_a_dataset_with_one_class_exits_2_naming_it(tmp_path, cache):
    folder = tmp_path / "one"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 16)):
        np.save(folder / f"x_{split}.npy", rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
        np.save(folder / f"y_{split}.npy", np.zeros(n, dtype=np.int64))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_layerkd.app.train",
            "dataset=arrays",
            f"dataset.data_dir={folder}",
            "epochs=1",
            "teacher_epochs=1",
            "milestones=[1]",
            "every_n_epochs=1",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "LAYERKD_CACHE": str(cache)},
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "its labels hold 1 class; a classifier" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"method": 3, "schedule": "s", "dataset": "D", "student": {}}', "method is 3, not a"),
        (
            '{"method": "m", "schedule": "s", "dataset": "D", "student": {"val_acc": "abc"}}',
            "student.val_acc is 'abc', not a number",
        ),
        (
            '{"method": "m", "schedule": "s", "dataset": "D", "student": {"history": "x"}}',
            "student.history is not a list of epochs of numbers",
        ),
        (
            '{"method": "m", "schedule": "s", "dataset": "D", "student": {}, "teacher": [1]}',
            "teacher is list, not an object",
        ),
        ("[1, 2]", "it holds a JSON list, not an object"),
        ("[" * 100000, "unreadable (RecursionError"),
    ],
)
def test_the_report_never_crashes_on_a_malformed_results_json(tmp_path, capsys, content, problem):
    """Each malformed results.json (right JSON, wrong shapes) is named beside the table of the
    good runs, instead of a traceback in the table or the curves."""
    _result(tmp_path / "0", "s", 0, 0.5)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "results.json").write_text(content)
    report_main([str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"layerkd-report: warning: {tmp_path / '1' / 'results.json'}: " in err
    assert problem in err
    assert (
        "| Attention | Layerwise Update | 50.00 |" in (tmp_path / "out" / "table1.md").read_text()
    )


def test_the_report_lists_a_crashed_single_run_with_its_resume_command(tmp_path, capsys):
    """A single run (``outputs/<date>/<time>``) that crashed keeps its ``.hydra/`` and
    checkpoints but has no results.json: it is named with the command that resumes it."""
    _result(tmp_path / "good", "s", 0, 0.5)
    crashed = tmp_path / "crashed (1)"
    (crashed / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(["seed=1", "method=attention"]), crashed / ".hydra" / "overrides.yaml"
    )
    (crashed / "checkpoints").mkdir()
    (crashed / "checkpoints" / "last.ckpt").write_bytes(b"")
    report_main([str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    (line,) = [
        ln for ln in err.splitlines() if ln.startswith(f"layerkd-report: warning: {crashed}")
    ]
    head = f"layerkd-report: warning: {crashed}: run has no results.json, it crashed or was stopped"
    assert line.startswith(f"{head}; resume it: ")
    words = shlex.split(line.split("; resume it: ", 1)[1])  # as a shell splits it
    assert words == [
        "layerkd-train",
        "seed=1",
        "method=attention",
        f"hydra.run.dir='{crashed}'",  # quoted for Hydra: a space and parentheses
        "ckpt_path=last",
    ]


def test_the_report_never_averages_runs_with_different_settings_as_seeds():
    """Three trials of a search (lr differs) and two seeds of one setting: the trials are rows
    of their own, labelled by the setting; only the seeds are averaged."""
    from lightning_layerkd.app.report import table

    def run(lr, seed, acc):
        return {
            "method": "jacobian",
            "schedule": "layerwise",
            "dataset": "D",
            "config": {"seed": seed, "lr": lr, "output_dir": f"/x/{lr}/{seed}"},
            "student": {"val_acc": acc, "history": []},
        }

    _, rows = table([run(0.01, 0, 0.5), run(0.1, 0, 0.7), run(0.1, 1, 0.8)])
    assert rows[:2] == [
        ["Jacobian", "Layerwise Update [lr=0.01]", "50.00"],
        ["", "Layerwise Update [lr=0.1]", "75.00 ± 7.07 (n=2)"],
    ]
    _, rows = table([run(0.1, 0, 0.7), run(0.1, 1, 0.8)])  # seeds only: one row, averaged
    assert rows[0] == ["Jacobian", "Layerwise Update", "75.00 ± 7.07 (n=2)"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=attention_transfer", "method.beta=-1"], "method.beta must be finite and non-neg"),
        (["method=attention_transfer", "method.p=0"], "p must be positive"),
        (["method=fitnet", "method.hint_weight=-2"], "method.hint_weight must be finite"),
    ],
)
def test_feature_method_options_are_refused_by_name(overrides, message):
    from lightning_layerkd.app.checks import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(config(*TINY_ANY_METHOD, *overrides))
