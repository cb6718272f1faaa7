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
    out = capsys.readouterr()
    # a person reads a few lines and where the results are; the JSON stays in summary.json
    assert len((out.out + out.err).splitlines()) <= 4, out.out + out.err
    assert f"results in {run_dir}" in out.out


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


def _params(run_dir):
    import torch

    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    return torch.cat([v.reshape(-1) for v in state["model"].values()])


def _local(*argv):
    return ["train", "--backend", "local", "--workload", "tiny_mlp", "--no-progress", *argv]


def test_local_resume_from_a_relative_run_directory_continues_bit_identically(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    assert main(_local("--steps", "30", "--checkpoint-every", "10", "--run-dir", "full")) == 0
    assert main(_local("--steps", "20", "--checkpoint-every", "10", "--run-dir", "first")) == 0
    assert main(_local("--steps", "30", "--resume-from", "first", "--run-dir", "resumed")) == 0
    assert torch.equal(_params(tmp_path / "resumed"), _params(tmp_path / "full"))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [30]  # the counter continues
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 20
    assert "first/checkpoints/step_00000020" in (tmp_path / "resumed" / "config.yaml").read_text()


def test_a_flag_the_local_backend_cannot_honour_is_refused(tmp_path, capsys):
    assert main(_local("--num-workers", "2", "--run-dir", str(tmp_path / "x"))) == 2
    err = capsys.readouterr().err
    assert "--num-workers needs Ray Train workers" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_use_gpu_without_gpus_is_one_sentence_not_a_ray_timeout(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", "--use-gpu", "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--use-gpu" in err and "has 0" in err and len(err.splitlines()) == 1


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\noptimizer: {name: osfn, lr: [\n")
    assert main(_local("--config", str(bad))) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line" in err and len(err.splitlines()) == 1


def test_missing_checkpoint_is_refused_before_a_run_directory_is_written(tmp_path, capsys):
    assert main(_local("--resume-from", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r"))) == 2
    assert "no osfn-dist checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_config_yaml_is_the_resolved_config_and_reproduces_the_run(tmp_path, capsys):
    import yaml

    from osfn_dist.core.config import OSFNConfig

    a = tmp_path / "a"
    assert main(_local("--steps", "20", "--lr", "0.005", "--subspace-dim", "3", "--run-dir", str(a))) == 0
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    assert set(OSFNConfig.field_names()) <= set(cfg["optimizer"])  # every hyperparameter, defaults included
    assert cfg["optimizer"]["subspace_dim"] == 3 and cfg["optimizer"]["lr"] == 0.005 and cfg["steps"] == 20
    b = tmp_path / "b"
    assert main(["train", "--config", str(a / "config.yaml"), "--run-dir", str(b), "--no-progress"]) == 0
    assert read_metrics(a / "metrics.jsonl") != [] and [r["loss"] for r in read_metrics(b / "metrics.jsonl")] == [
        r["loss"] for r in read_metrics(a / "metrics.jsonl")]


def test_local_backend_serves_metrics_on_metrics_port(tmp_path, capsys):
    import socket
    import urllib.request

    import pytest

    pytest.importorskip("prometheus_client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(_local("--steps", "12", "--metrics-port", str(port), "--run-dir", str(tmp_path / "m"))) == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = [ln for ln in text.splitlines() if ln.startswith("osfn_steps_total{")][0]
    assert float(line.split()[-1]) == 12
