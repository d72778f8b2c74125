"""Training throughput (issue #6, part 3): the target stage against a bare timm loop.

Three numbers on the same model, batch size and images:

* ``run_stage``: `fedbridge train` end to end per epoch (its own data pipeline: ×N offline
  expansion and online augmentation drawn per item, as a user runs it), from the bundle's
  per-epoch history;
* ``engine``: the product's training loop (``engine.train_one_epoch``: AdamW, cosine schedule,
  finite-loss check) over the *same tensors* materialised once;
* ``bare``: a plain ``for x, y: loss.backward(); opt.step()`` timm loop over those tensors.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from bench._common import WORK, Results, log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    epochs = 1 if args.quick else 2
    import torch
    from rich.console import Console
    from torch.utils.data import DataLoader, TensorDataset

    from bench import accuracy
    from fedbridge_shared.data.tensors import ImageDataset, load_images
    from fedbridge_shared.engine import make_optimizer, train_one_epoch
    from fedbridge_shared.models import init_model
    from fedbridge_shared.spec import load_bundle
    from fedbridge_shared.training import TrainConfig, run_stage, usable_index

    arch, size, batch, aug = "mobilenetv1_025", 128, 16, accuracy.FULL["augment_per_sample"]
    res = Results("train_throughput", mode, {"arch": arch, "image_size": size, "batch_size": batch,
                                             "augment_per_sample": aug, "epochs": epochs,
                                             "torch_threads": torch.get_num_threads()})  # fmt: skip
    accuracy.ACC["dir"] = WORK / f"acc-{mode}"
    split = accuracy.make_split("cxr", 0, None)
    pool = accuracy.pooled(split)

    # 1. the product's target stage, end to end
    out = WORK / f"throughput-{mode}" / "target"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(epochs=epochs, batch_size=batch, augment_per_sample=aug, seed=0,
                      patience=epochs + 1)  # fmt: skip
    log("throughput: fedbridge train (run_stage)")
    t0 = time.perf_counter()
    run_stage(
        "train",
        pool,
        out=out,
        init="imagenet",
        config=cfg,
        arch=arch,
        image_size=size,
        console=Console(stderr=True, quiet=True),
    )
    wall = time.perf_counter() - t0
    hist = load_bundle(out).training["history"]
    n_train = sum(load_bundle(out).training["counts"]["train"].values()) * (1 + aug)
    per_epoch = [n_train / h["seconds"] for h in hist]
    res["run_stage"] = {"images_per_epoch": n_train, "epoch_s": [h["seconds"] for h in hist],
                        "img_per_s": float(np.median(per_epoch)), "wall_s": wall}  # fmt: skip
    log(f"  run_stage: {res['run_stage']['img_per_s']:.1f} img/s")

    # 2./3. the same images, materialised once as tensors (one pass of the dataset)
    index = usable_index(pool)
    model, spec = init_model("imagenet", index.labels, arch, size)
    train_samples = list(index.samples)
    images = load_images(train_samples, size)
    targets = [spec.labels.index(s.label) for s in train_samples]
    ds = ImageDataset(
        images, targets, spec, preset="cxr", augment_per_sample=aug, online=True, seed=0
    )
    t0 = time.perf_counter()
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([ds[i][1] for i in range(len(ds))])
    res["materialise_s_per_image_ms"] = (time.perf_counter() - t0) / len(ds) * 1e3
    tds = TensorDataset(xs, ys)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loader():
        return DataLoader(tds, batch_size=batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    rates: dict[str, list[float]] = {"engine": [], "bare": []}
    for rep in range(epochs + 1):  # first repetition is warm-up
        for kind in ("engine", "bare"):
            model.load_state_dict(state)
            model.train()
            opt = make_optimizer(model, lr=5e-4, weight_decay=1e-4)
            dl = loader()
            t0 = time.perf_counter()
            if kind == "engine":
                steps = len(dl)
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt,
                    lambda s, steps=steps: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
                )
                stats = train_one_epoch(model, dl, opt, torch.device("cpu"), scheduler=sched)
                n = stats.n
            else:
                crit = torch.nn.CrossEntropyLoss()
                n = 0
                for x, y in dl:
                    loss = crit(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    n += len(y)
            rate = n / (time.perf_counter() - t0)
            if rep:
                rates[kind].append(rate)
            log(f"  {kind} rep {rep}: {rate:.1f} img/s")
    res["engine"] = {"img_per_s": float(np.median(rates["engine"])), "reps": rates["engine"]}
    res["bare"] = {"img_per_s": float(np.median(rates["bare"])), "reps": rates["bare"]}
    res["ratio_engine_vs_bare"] = res["engine"]["img_per_s"] / res["bare"]["img_per_s"]
    res["ratio_run_stage_vs_bare"] = res["run_stage"]["img_per_s"] / res["bare"]["img_per_s"]
    res.done()
    log(f"throughput done: engine/bare {res['ratio_engine_vs_bare']:.2f}, "
        f"run_stage/bare {res['ratio_run_stage_vs_bare']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
