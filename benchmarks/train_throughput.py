"""SAFN training throughput (samples/s) against the MLP baseline, same data, same process.

    .venv/bin/python benchmarks/train_throughput.py [--epochs 30] [--threads 1] [--set key=value]

Both models train on the preprocessed default synthetic cohort (all features). SAFN runs the real
training loop (`run_epochs`: CB-focal loss + gate entropy, AdamW, the configured batch); the
baseline is a torch MLP of comparable width on the concatenated features with the same loop
shape, the same optimizer and the same dropout layer as SAFN's (`FastDropout`), and
scikit-learn's MLPClassifier (the `mlp` baseline of safn-train) is timed per epoch as well.
``--repeats N`` times both models N times, alternating, and prints mean ± SD of the ratio.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch import nn

from safn_core.config import load_config
from safn_core.data.sources import load_cohort
from safn_core.model.grouped import FastDropout
from safn_core.preprocess import Preprocessor
from safn_core.training.local import Arrays, make_loader, make_model, make_optimizer, run_epochs


def time_safn(arrays, cohort, cfg, epochs):
    model = make_model(cohort.modalities, cfg.model, 0)
    opt = make_optimizer(model, cfg.train)
    loader = make_loader(arrays, cfg.train.batch_size, 0)
    run_epochs(model, loader, opt, 1, cfg.model, arrays.class_counts())  # warm-up
    t = time.perf_counter()
    run_epochs(model, loader, opt, epochs, cfg.model, arrays.class_counts())
    return epochs * len(arrays) / (time.perf_counter() - t), sum(p.numel() for p in model.parameters())


def time_torch_mlp(arrays, cfg, epochs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(arrays.x.shape[1], 128), nn.GELU(), FastDropout(0.2),
                          nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 2))
    opt = make_optimizer(model, cfg.train)  # the same optimizer as SAFN's
    loader = make_loader(arrays, cfg.train.batch_size, 0)
    loss_fn = nn.CrossEntropyLoss()

    def epoch():
        for xb, _, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()

    epoch()
    t = time.perf_counter()
    for _ in range(epochs):
        epoch()
    return epochs * len(arrays) / (time.perf_counter() - t), sum(p.numel() for p in model.parameters())


def time_sklearn_mlp(arrays, epochs):
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=epochs, batch_size=32,
                        random_state=0, tol=0, n_iter_no_change=10 ** 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        clf.fit(arrays.x, arrays.y)
    return epochs * len(arrays) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="alternating SAFN/MLP timings")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="a config override for SAFN, e.g. model.ensemble_size=8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides)
    cohort = load_cohort(cfg.data, cfg.synth)
    pre = Preprocessor(cohort.modalities).fit(cohort.table)
    arrays = Arrays.from_table(pre, cohort.table)
    print(f"data: {len(arrays)} participants x {arrays.x.shape[1]} features, "
          f"{len(cohort.modalities)} modalities; {args.epochs} epochs, batch "
          f"{cfg.train.batch_size}, {args.threads} thread(s)")
    ratios = []
    for _ in range(args.repeats):
        safn, n_safn = time_safn(arrays, cohort, cfg, args.epochs)
        mlp, n_mlp = time_torch_mlp(arrays, cfg, args.epochs)
        ratios.append(safn / mlp)
    sk = time_sklearn_mlp(arrays, args.epochs)
    print(f"{'model':<28}{'parameters':>12}{'samples/s':>12}{'vs torch MLP':>14}")
    print(f"{'SAFN':<28}{n_safn:>12,}{safn:>12,.0f}{safn / mlp:>14.2f}")
    print(f"{'MLP (torch, same loop)':<28}{n_mlp:>12,}{mlp:>12,.0f}{1.0:>14.2f}")
    print(f"{'MLP (scikit-learn baseline)':<28}{'':>12}{sk:>12,.0f}{sk / mlp:>14.2f}")
    if len(ratios) > 1:
        print(f"SAFN / torch MLP over {len(ratios)} alternating runs: {np.mean(ratios):.3f} ± "
              f"{np.std(ratios, ddof=1):.3f} (target >= 0.3: "
              f"{'MET' if np.mean(ratios) >= 0.3 else 'MISSED'})")


if __name__ == "__main__":
    main()
