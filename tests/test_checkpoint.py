"""osfn_dist.checkpoint in one process (the FSDP2 case runs in tests/test_distributed_equivalence.py)."""
import pytest
import torch

from osfn_dist import OSFN, DimensionMismatchError, checkpoint
from osfn_dist.workloads import get_workload


def _train(work, model, opt, first, last):
    for step, x, y in work.batches(last, seed=0):
        if step > first:
            opt.zero_grad()
            work.loss_fn(model(x), y).backward()
            opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _saved(path, steps):
    """A tiny_mlp run of ``steps`` steps, checkpointed to ``path``: (workload, model, opt)."""
    work = get_workload("tiny_mlp")
    model = work.build_model()
    opt = OSFN(model.parameters(), lr=3e-3, subspace_dim=4)
    _train(work, model, opt, 0, steps)
    checkpoint.save(path, model, opt)
    return work, model, opt


def test_save_and_load_continue_the_run_bit_for_bit(tmp_path):
    work, model, opt = _saved(tmp_path / "ckpt", 12)
    _train(work, model, opt, 12, 24)
    resumed = work.build_model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # the checkpoint, not the seed, must decide the weights
    resumed_opt = OSFN(resumed.parameters(), lr=3e-3, subspace_dim=4)
    checkpoint.load(tmp_path / "ckpt", resumed, resumed_opt)
    assert resumed_opt.diagnostics["step"] == 12
    _train(work, resumed, resumed_opt, 12, 24)
    assert torch.equal(_flat(resumed), _flat(model))


def test_loading_into_another_subspace_size_is_a_typed_error(tmp_path):
    work, _, _ = _saved(tmp_path / "ckpt", 3)
    other = work.build_model()
    with pytest.raises(DimensionMismatchError, match="subspace_dim"):
        checkpoint.load(tmp_path / "ckpt", other, OSFN(other.parameters(), lr=3e-3, subspace_dim=6))


def test_saving_or_reading_the_basis_changes_nothing():
    """Two identical runs, one of which saves a checkpoint and reads ``opt.basis`` midway
    (what rank 0 alone does in a Ray run): they must stay equal bit for bit. The basis is
    V R with R pending in d × d after each re-orthonormalisation; folding R into V on one
    replica only would round it differently from the others."""
    work = get_workload("tiny_mlp")
    runs = []
    for inspect in (False, True):
        model = work.build_model()
        opt = OSFN(model.parameters(), lr=3e-3, subspace_dim=4)
        _train(work, model, opt, 0, 20)  # past the re-orthonormalisation at step 16
        assert opt._pending is not None and not torch.equal(opt._pending, torch.eye(4, dtype=opt._pending.dtype))
        if inspect:
            opt.state_dict()
            v = opt.basis
            torch.testing.assert_close(v, opt._basis @ opt._pending.to(v.dtype), rtol=1e-5, atol=1e-6)  # V R
            # (orthonormal up to the drift of the 4 rank-1 updates since the re-orthonormalisation)
            assert torch.allclose(v.T.double() @ v.double(), torch.eye(4, dtype=torch.float64), atol=5e-2)
        _train(work, model, opt, 20, 40)
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])
