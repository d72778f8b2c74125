"""Every default of the training recipe, in one place.

The CLI options, :class:`~fedbridge_shared.training.TrainConfig`,
:class:`~fedbridge_shared.protocol.LocalSettings` and the federation's run config all read these;
``[tool.flwr.app.config]`` in ``pyproject.toml`` repeats them for Flower (a test keeps it equal).
"""

ARCH = "mobilenetv2_100"
"""timm model of the CPU preset (MobileNetV2 @ 224 with the offline ImageNet weights)."""
EPOCHS = 8
BATCH_SIZE = 16
LR = 5e-4
"""AdamW peak learning rate of the cosine schedule."""
WEIGHT_DECAY = 1e-4
PATIENCE = 3
VAL_FRACTION = 0.15
LABEL_SMOOTHING = 0.0
EMA_DECAY = 0.99
"""Decay of the EMA of weights validated and kept at a target stage (``train``; 0 = off: the raw
weights). Chosen on validation patients (BENCHMARKS.md §0); a stage shorter than the EMA's
horizon of 1 / (1 − decay) steps keeps its raw weights (``training.ema_plan``)."""
BRIDGE_EMA_DECAY = 0.0
"""The bridge stage's (``bridge``): off, as in the benchmarked bridges."""
SITE_EMA_DECAY = 0.0
"""A federated site's EMA within its round: off, a round (≈ 25 steps at a clinic's size) is
far shorter than the target's EMA horizon."""
BACKBONE_LR_SCALE = 1.0
"""Discriminative learning rates: every layer but the classifier at this fraction of the LR
(1: one LR). A recipe candidate measured on validation patients (BENCHMARKS.md §0)."""
BALANCED = False
"""Class-balanced sampling of training batches (inverse class frequency)."""
INTENSITY = "none"
"""Intensity normalisation before mean/std: ``none`` or ``clahe`` (recorded in the ModelSpec)."""
INTENSITIES = ("none", "clahe")
TTA = False
"""Test-time augmentation at evaluation (deterministic views, no flip for CXR)."""
AUGMENT = "cxr"
AUGMENT_PRESETS = ("cxr", "oct", "none")
"""Augmentation presets (``fedbridge_shared.data.augment`` defines them)."""
BRIDGE_AUGMENT_PER_SAMPLE = 0
TARGET_AUGMENT_PER_SAMPLE = 10
"""The paper's offline ×10 expansion of the small target set."""
SEED = 0
BOOTSTRAP = 1000  # resamples for every CI fedbridge prints: evaluate, federate --test-data, reports

ROUNDS = 3
LOCAL_EPOCHS = 1
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm")
STRATEGY = "fedavg"
SERVER_LR = 1.0
SERVER_MOMENTUM = 0.0
"""FedAvgM (``--strategy fedavgm``): server learning rate and momentum."""
PROXIMAL_MU = 0.01
ROUND_TIMEOUT = 600.0
JOIN_TIMEOUT = 1800.0  # the first round waits this long for every expected site
SITE_WAIT_TIMEOUT = 60.0  # later rounds: a lost site delays the round by at most this
