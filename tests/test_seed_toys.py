"""The seed paper's kind of test through the product's own code (bench/seed_toys.py)."""
import importlib.util
from pathlib import Path

import torch

from osfn_dist import LOW_DIMENSIONAL, OSFN

spec = importlib.util.spec_from_file_location("seed_toys", Path(__file__).parents[1] / "bench" / "seed_toys.py")
toys = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toys)


def _adamw(p):
    return torch.optim.AdamW(p, lr=0.3, weight_decay=0.0)  # its best rate on Beale (bench/seed_toys.py)


def test_low_dimensional_preset_beats_adamw_by_10x_on_noisy_beale():
    func, starts = toys.FUNCTIONS["beale"]
    starts = starts[::3]  # 9 of the 25 starts keep the test to a few seconds
    osfn = toys.score(func, starts, lambda p: OSFN(p, lr=1e-3, **LOW_DIMENSIONAL), 0.1, 1)
    adamw = toys.score(func, starts, _adamw, 0.1, 1)
    assert osfn * 10 < adamw, (osfn, adamw)


def test_saddle_free_step_escapes_the_double_well_saddle_a_plain_newton_step_would_keep():
    func, _ = toys.FUNCTIONS["double_well"]
    # start on the saddle's stable manifold: ∇f points at the saddle (0, 0), f(saddle) = 1
    values = [toys.final_value(func, (1.5, 0.0), lambda p: OSFN(p, lr=1e-3, **LOW_DIMENSIONAL), 0.1, s)
              for s in range(3)]
    assert max(values) < 0.05, values  # reached a minimum (f = 0), not the saddle (f = 1)


def test_a_diverging_run_counts_as_diverged_not_as_an_error():
    func, _ = toys.FUNCTIONS["rosenbrock"]
    value = toys.final_value(func, (2.0, 3.0), lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9), 0.1, 0)
    assert value == 1e10
