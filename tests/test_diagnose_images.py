"""Calibration of ``diagnose`` on a trained net (the fixed-pairs case of ``benchmarks/diagnose_calibration.py``).

The pair-memorization experiment's protocol at its --quick sizes: 128 random (adversarial) pairs between
N(0, I_16) and N(3, I_16), an MLP 3 x 256 trained 2000 steps with CFM(sigma = 0). The net reproduces its training
pairing, and the pairing check (given the pairs and their OT partners) says so. About 10 s on a shared 2-core CPU.
The image cases (CelebA 8x8, tiny UNet) take minutes and stay in the benchmark; their results are in
docs/diagnose.md, "Calibration on trained image models".
"""

import torch

from flowprobe.couplings import FixedPairs, ot_permutation
from flowprobe.diagnosis import DiagnoseOptions, diagnose
from flowprobe.experiments.lowdim import train_velocity
from flowprobe.paths import make_path
from flowprobe.probes.memorization import PairSet


def test_trained_fixed_pairs_sigma0_memorises_by_pairing():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(128, 16, generator=g)
    x1 = torch.randn(128, 16, generator=g) + 3.0
    targets = x1[torch.randperm(128, generator=g)]
    ot = ot_permutation(x0, targets, "lsa")
    held = torch.randn(1000, 16, generator=torch.Generator().manual_seed(1)) + 3.0
    net, _ = train_velocity(16, FixedPairs(x0, targets), 0.0, width=256, depth=3, steps=2000, batch_size=128,
                            lr=2e-3, seed=7, device="cpu")
    pairs = PairSet(x0, targets, {"assigned": torch.arange(128), "ot": ot})
    d = diagnose(net, None, held, pairs=pairs, path=make_path(0.0), options=DiagnoseOptions(n_generate=1000))
    assert d.label == "memorises", d.to_json()
    assert "pairing" in d.verdict.decided_by
    ev = d.checks["pairing"].evidence
    assert ev["recall_assigned_interval"][0] >= 0.5 and ev["recall_ot"] < 0.1
