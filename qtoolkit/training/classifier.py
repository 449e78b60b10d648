"""Training of the Fashion-MNIST feature classifier used by the evaluation metrics."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_fashion_mnist
from ..models.classifier import FashionClassifier
from ..progress import track


@torch.no_grad()
def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def train_classifier(out: Path, epochs: int = 6, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     data_root: str | None = None, overwrite: bool = False) -> float:
    """Train on the train split, report test accuracy, save to `out`; returns the test accuracy."""
    torch.manual_seed(seed)
    x_train, y_train = load_fashion_mnist("train", data_root)
    x_test, y_test = load_fashion_mnist("test", data_root)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in track(range(steps_per_epoch), f"classifier epoch {epoch + 1}/{epochs}", unit="batch"):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = x_train[idx]
            # Horizontal flips and 2-pixel shifts: cheap augmentations that keep clothing classes.
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, x_test, y_test):.4f}")
    acc = accuracy(model, x_test, y_test)
    model.save_pretrained(out, metadata={"test_accuracy": acc, "epochs": epochs, "batch_size": batch_size,
                                         "lr": lr, "seed": seed, "train_seconds": round(time.perf_counter() - t0, 1)},
                          overwrite=overwrite)
    return acc
