"""`osfn-dist train --backend local`: the single-process run and its run directory."""
import json

from osfn_dist.cli import main
from osfn_dist.train.rundir import read_metrics


def test_local_run_writes_the_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(["train", "--backend", "local", "--workload", "tiny_mlp", "--steps", "40", "--run-dir", str(run_dir),
               "--no-progress"])
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_loss", "steps", "num_workers", "optimizer", "wall_seconds"):
        assert key in summary
    assert summary["steps"] == 40 and summary["num_workers"] == 1 and summary["optimizer"] == "osfn"
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(10, 41, 10))  # log_every 10
    assert records[-1]["loss"] < records[0]["loss"] * 1.5 and "eigenvalues" in records[-1]
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "curvature.png").read_bytes()[:4] == b"\x89PNG"  # eigenvalues and step norms
    assert records[-1]["complement_step_norm"] > 0
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoint.pt").exists()
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(run_dir)


def test_unknown_workload_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["train", "--backend", "local", "--workload", "nope", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown workload 'nope'" in err and "mnist1d_mlp" in err
    assert main(["train", "--backend", "local", "--workload", "no_such_pkg.mod:fn"]) == 2
    assert "cannot load workload" in capsys.readouterr().err


def test_invalid_hyperparameter_from_the_command_line(capsys):
    assert main(["train", "--backend", "local", "--lr", "-1"]) == 2
    assert "lr=-1.0" in capsys.readouterr().err


def test_a_run_without_a_curvature_model_writes_no_curvature_plot(tmp_path, capsys):
    run_dir = tmp_path / "adamw"
    assert main(["train", "--backend", "local", "--workload", "tiny_mlp", "--steps", "20", "--optimizer", "adamw",
                 "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "loss.png").exists() and not (run_dir / "curvature.png").exists()


def test_train_help_states_each_default_once_and_lists_workloads_and_settings(capsys):
    import pytest

    from osfn_dist.core.config import OSFNConfig
    from osfn_dist.workloads.builtin import BUILTIN

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    assert all(name in text for name in BUILTIN)
    assert all(f"{field}=" in text for field in OSFNConfig.field_names())
