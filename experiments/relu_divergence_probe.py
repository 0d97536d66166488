"""Why the default hybrid BDFA diverged with ReLU on MNIST: loss, per-layer gradient alignment
and feature norms over the first steps, ReLU against tanh (10% of MNIST, small_cnn, Adam 1e-3).

    python experiments/relu_divergence_probe.py [--steps 350] [--every 50] [--data-dir DIR]

Prints JSON: for each activation, one record every ``--every`` steps with the batch loss, the
alignment (cosine with back-propagation's gradient, mean over the batch) of every hidden layer and
the mean L2 norm of every feedback point's activations (the inputs of the layers after each
hidden layer).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import dfatorch
from dfatorch.alignment import gradient_alignment
from dfatorch.data import BatchLoader, load_dataset, stratified_subset
from dfatorch.models import build_model


def probe(activation: str, steps: int, every: int, data_dir: str | None) -> list[dict]:
    splits = load_dataset("mnist", data_dir)
    train = splits.train.subset(stratified_subset(splits.train.labels, 0.1, 0))
    torch.manual_seed(0)
    model = build_model("small_cnn", splits.input_shape, splits.num_classes, activation=activation)
    engine = dfatorch.attach(model, "bdfa", scope="fc")
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loader = BatchLoader(train, 64, shuffle=True, augment=False, mean=splits.mean,
                         std=splits.std, seed=0, device="cpu")  # fmt: skip
    records, step, epoch = [], 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            if step % every == 0:
                layers = gradient_alignment(engine, x, y, F.cross_entropy)
                with torch.no_grad(), engine.capturing() as points:
                    loss = F.cross_entropy(model(x), y).item()
                records.append({
                    "step": step,
                    "loss": loss,
                    "alignment": {a.name: a.mean for a in layers},
                    "feature_norms": [p.flatten(1).norm(dim=1).mean().item() for p in points],
                })  # fmt: skip
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {act: probe(act, args.steps, args.every, args.data_dir) for act in ("relu", "tanh")}
    print(json.dumps({"config": vars(args), "runs": out}, indent=1))


if __name__ == "__main__":
    main()
