"""The benchmark harness end to end on a seconds-long configuration."""
import json
import math

from osfn_dist.bench.suite import SuiteConfig, markdown, run_suite, summarize, write_outputs
from osfn_dist.cli import main


def test_bench_runs_equal_grids_and_reports(tmp_path):
    cfg = SuiteConfig(workloads=("tiny_mlp",), optimizers=("adamw", "osfn"), steps=12, grid=2, seeds=2,
                      eval_points=4, out_dir=str(tmp_path / "b"))
    runs = run_suite(cfg)
    # equal tuning budget: 2 learning rates on seed 0, then the best one on seed 1, for each optimizer
    for opt in ("adamw", "osfn"):
        mine = [r for r in runs if r["optimizer"] == opt]
        assert len({r["lr"] for r in mine if r["seed"] == 0}) == 2 and len(mine) == 3
    table = write_outputs(cfg, runs)
    row = table["tiny_mlp"]["osfn"]
    assert row["seeds"] == 2 and row["state_bytes"] > table["tiny_mlp"]["adamw"]["state_bytes"]  # + the basis
    assert table["tiny_mlp"]["adamw"]["step_time_vs_adamw"] == 1.0
    assert (tmp_path / "b" / "curves.png").stat().st_size > 1000
    assert "| OSFN over AdamW" in (tmp_path / "b" / "table.md").read_text()
    assert "peak MB" in (tmp_path / "b" / "table.md").read_text() and row["peak_rss_bytes"] > 0


def test_diverged_runs_are_reported_not_crashed():
    run = {"workload": "w", "optimizer": "adamw", "lr": 1.0, "seed": 0, "curve": [(0, 1.0), (10, 0.5)],
           "final_train_loss": 0.5, "test_loss": 0.6, "step_seconds": 0.01, "state_bytes": 8, "params": 4,
           "diverged": False}
    bad = dict(run, seed=1, final_train_loss=math.inf, test_loss=math.inf, diverged=True, curve=[(0, 1.0)])
    table = summarize([run, bad])
    assert math.isinf(table["w"]["adamw"]["final_train_mean"]) and math.isnan(table["w"]["adamw"]["final_train_std"])
    assert "1 runs diverged" in markdown(table)


def test_report_only_rebuilds_from_runs_json(tmp_path, capsys):
    cfg = SuiteConfig(workloads=("tiny_mlp",), optimizers=("adamw",), steps=6, grid=2, seeds=1, eval_points=2,
                      out_dir=str(tmp_path))
    write_outputs(cfg, run_suite(cfg))
    (tmp_path / "table.md").unlink()
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").exists() and json.loads((tmp_path / "runs.json").read_text())
    assert "AdamW" in capsys.readouterr().out


def test_each_osfn_variant_without_a_subspace_is_exactly_its_peer():
    """Like for like: the OSFN entries wrap their peer's own optimizer, so with
    subspace_dim=0 they follow the peer's trajectory bit for bit (a model with matrices and
    vectors: Muon's AdamW-on-vectors half is compared too; heavyball SOAP included). Fails if
    the wrapper changes what the base does."""
    from osfn_dist.bench.peers import OSFN_PEER_OF, PEERS, osfn_over
    from osfn_dist.bench.runner import run_one
    from osfn_dist.workloads import get_workload

    for workload in ("tiny_mlp", "mnist1d_cnn"):  # vectors and matrices; conv kernels
        wl = get_workload(workload)
        assert any(p.ndim == 1 for p in wl.build_model().parameters())
        for name, peer_name in OSFN_PEER_OF.items():
            ablated = PEERS[name].__class__(name, osfn_over(peer_name, subspace_dim=0), 1e-2)
            ours, theirs = (run_one(wl, p, 1e-2, seed=0, steps=15, eval_points=15) for p in (ablated, PEERS[peer_name]))
            assert ours["curve"] == theirs["curve"], (workload, name)
            assert ours["curve"][-1][1] < ours["curve"][0][1]  # it trained
            # and the subspace is what differs in the real entry
            full = run_one(wl, PEERS[name], 1e-2, seed=0, steps=15, eval_points=15)
            assert full["curve"][-1] != theirs["curve"][-1]


def test_peak_memory_is_measured_per_run():
    """The bench's peak-MB column: the kernel's peak-RSS mark is reset before each run, so a
    64 MiB allocation shows up as ~64 MiB, and a run that allocates nothing shows ~0."""
    import torch

    from osfn_dist.bench.runner import peak_rss, reset_peak_rss

    base = reset_peak_rss()
    big = torch.ones(16 * 2**20)  # 64 MiB, touched
    del big
    grown = peak_rss() - base
    assert 60 * 2**20 <= grown <= 100 * 2**20
    base = reset_peak_rss()
    assert peak_rss() - base < 16 * 2**20  # the mark was reset, not carried over


def test_step_time_bench_prints_the_reads_of_v_table():
    """bench/step_time.py at a toy size: every optimizer's row, ratios against both AdamWs and
    the overhead in reads of V (a unit timed in every round), plus the per-phase profile."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "step_time.py"
    out = subprocess.run(
        [sys.executable, str(script), "--width", "64", "--rounds", "1", "--steps", "3", "--every", "4",
         "--only", "OSFN d=8", "OSFN d=8, eager torch passes", "OSFN d=8 curvature_every=4", "--profile"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    for name in ("AdamW", "AdamW (fused)", "OSFN d=8", "OSFN d=8, eager torch passes", "OSFN d=8 curvature_every=4"):
        assert name in rows, out.stdout
    assert rows["AdamW (fused)"].rstrip(" |").endswith("| 1.00× | 0.0")
    assert "one read of V" in out.stdout and "osfn.newton_move" in out.stdout
    lm = subprocess.run([sys.executable, str(script), "--workload", "char_lm", "--batch", "4", "--rounds", "1",
                         "--steps", "2", "--every", "--only", "OSFN d=8"], capture_output=True, text=True, timeout=300)
    assert lm.returncode == 0, lm.stderr
    assert lm.stdout.startswith("workload char_lm, ") and "| OSFN d=8 |" in lm.stdout
