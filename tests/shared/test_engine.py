"""The shared training loop on real images with a tiny timm model."""

import torch
from torch.utils.data import DataLoader

from fedbridge_shared.data.samples import scan_folder
from fedbridge_shared.data.tensors import ImageDataset, load_images
from fedbridge_shared.engine import CosineSchedule, evaluate, fit, proximal_penalty
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
        val_loader=DataLoader(ds, batch_size=12),
        device=torch.device("cpu"),
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


def test_cosine_schedule_known_values_and_a_slice_continues_the_whole():
    whole = CosineSchedule(total_steps=100)
    assert whole.factor(0) == 1.0 and abs(whole.factor(50) - 0.5) < 1e-12
    assert whole.factor(100) == 0.0 and whole.factor(150) == 0.0  # clamped at the end
    # round 3 of 4, 25 steps per round: step s of that round is step 50 + s of the whole
    round3 = CosineSchedule(total_steps=100, start_step=50)
    assert all(round3.factor(s) == whole.factor(50 + s) for s in range(25))


def test_proximal_penalty_is_half_mu_times_squared_distance():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    penalty = proximal_penalty(model, mu=0.5)
    assert penalty().item() == 0.0  # anchored at the current weights
    with torch.no_grad():
        model.weight.add_(torch.tensor([[3.0, -4.0]]))  # distance² = 25
    assert abs(penalty().item() - 0.5 / 2 * 25) < 1e-6
