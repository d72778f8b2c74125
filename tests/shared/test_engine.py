"""The shared training loop on real images with a tiny timm model."""

import torch
from torch.utils.data import DataLoader

from fedbridge_shared.data.samples import scan_folder
from fedbridge_shared.data.tensors import ImageDataset, load_images
from fedbridge_shared.engine import evaluate, fit
from fedbridge_shared.models import init_model


def test_fit_learns_and_restores_the_best_validation_weights(oct_root):
    # Prepare: 12 real OCT images of two classes
    index = scan_folder(oct_root)
    samples = index.by_label("CNV")[:6] + index.by_label("NORMAL")[:6]
    targets = [0] * 6 + [1] * 6
    torch.manual_seed(0)
    model, spec = init_model("none", ("CNV", "NORMAL"), "test_efficientnet", 64)
    ds = ImageDataset(load_images(samples, 64), targets, spec)
    loader = DataLoader(ds, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0))
    # Execute
    result = fit(
        model,
        loader,
        DataLoader(ds, batch_size=12),
        torch.device("cpu"),
        epochs=8,
        lr=3e-3,
        patience=8,
    )
    # Assert
    losses = [r["val_loss"] for r in result.history]
    after = evaluate(model, DataLoader(ds, batch_size=12), torch.device("cpu"))
    assert len(result.history) == 8 and result.best_epoch == 1 + losses.index(min(losses))
    assert abs(after.loss - min(losses)) < 1e-5  # best weights restored
    train_losses = [r["train_loss"] for r in result.history]
    assert min(train_losses[-3:]) < train_losses[0]  # it learns
