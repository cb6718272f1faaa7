"""Where one-step-stale pipelining hurts: through the Newton step, or through the bookkeeping?

    python bench/staleness_probe.py [WORKLOAD]     # default mnist1d_cnn; 4 seeds, 300 steps, lr 0.01 (~1 min)

Pairs each setting with and without ``pipelined=True``: a stronger Newton step in parameter
coordinates (eig_floor 0.1), and preconditioned coordinates with the Newton step off
(newton_lr 0: the subspace, the regression and the pipeline's bookkeeping all run, nothing
is stepped). Prints the mean and per-seed final train loss.
"""
import statistics, sys
from osfn_dist.bench.peers import Peer, _osfn, PEERS
from osfn_dist.bench.runner import run_one
from osfn_dist.workloads import get_workload
w = get_workload(sys.argv[1] if len(sys.argv) > 1 else "mnist1d_cnn"); lr = 0.01
cfgs = {"eig_floor 0.1": dict(eig_floor=0.1), "eig_floor 0.1, pipelined": dict(eig_floor=0.1, pipelined=True),
        "precond, newton_lr 0 (observe)": dict(coordinates="preconditioned", newton_lr=0.0),
        "precond, newton_lr 0, pipelined": dict(coordinates="preconditioned", newton_lr=0.0, pipelined=True)}
for name, kw in cfgs.items():
    ls = [run_one(w, Peer(name, _osfn(**kw), lr), lr, s, 300)["final_train_loss"] for s in range(4)]
    print(f"{name:40s} {statistics.fmean(ls):.4f}  {[round(x, 4) for x in ls]}", flush=True)
