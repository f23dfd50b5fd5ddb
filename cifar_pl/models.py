"""The networks: the improved CNN (default) and the original LeNet-style net kept for comparison.

Both are plain ``nn.Module``s built from a short name (see ``build_network``), so a checkpoint's
hyperparameters (primitives only) are enough to rebuild the model without this project's configs.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

# Where the improved CNN's head applies dropout: after both hidden FC layers (64- and 32-wide), after the
# first (64-wide) only, after the last (32-wide, just before the output layer) only.
DROPOUT_PLACEMENTS = ("both", "first", "last")


class ImprovedCNN(nn.Module):
    """Three conv blocks (conv3x3 + BatchNorm + ReLU + 2x2 max-pool), global average pooling,
    then FC 128-64-32-classes with dropout: about 104k parameters for 3-channel input.

    Global average pooling makes the head independent of the input size, which keeps the
    parameter count small and lets the same net take 28x28 or 32x32 images.

    ``dropout_placement`` (one of ``DROPOUT_PLACEMENTS``) says after which hidden FC layers dropout is
    applied; a place without it holds an ``nn.Identity``, so the layers keep their indices and every
    placement loads the same checkpoints.
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.5, dropout_placement: str = "both"
    ) -> None:
        super().__init__()
        if dropout_placement not in DROPOUT_PLACEMENTS:
            raise ValueError(f"unknown dropout placement {dropout_placement!r}; choose one of {DROPOUT_PLACEMENTS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be a probability in [0, 1)")

        def maybe_dropout(place: str) -> nn.Module:
            return nn.Dropout(dropout) if dropout_placement in ("both", place) else nn.Identity()

        layers: list[nn.Module] = []
        channels = [in_channels, 32, 64, 128]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            maybe_dropout("first"),
            nn.Linear(64, 32),
            nn.ReLU(inplace=True),
            maybe_dropout("last"),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


class LegacyNet(nn.Module):
    """The original system's LeNet-style net: conv 6@5x5, conv 16@5x5 with 2x2 pooling,
    FC 400-120-84-classes. It expects 32x32 input (16 * 5 * 5 = 400 features)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


NETWORKS: dict[str, type[nn.Module]] = {"cnn": ImprovedCNN, "legacy": LegacyNet}


def build_network(
    arch: str, in_channels: int, num_classes: int, dropout: float = 0.5, dropout_placement: str = "both"
) -> nn.Module:
    """Build a network by its short name (``cnn`` or ``legacy``), its weights in channels-last order.
    The dropout settings are the improved CNN's; the legacy net has no dropout.

    Channels-last is a memory layout, not a change of shapes or results: PyTorch's CPU max-pool kernel is
    10-20x faster on it than on NCHW, which makes a CNN training step about 1.6x faster here (and it is
    the layout tensor cores want on GPUs)."""
    if arch not in NETWORKS:
        raise ValueError(f"unknown network {arch!r}; choose one of {sorted(NETWORKS)}")
    net = (
        ImprovedCNN(in_channels, num_classes, dropout=dropout, dropout_placement=dropout_placement)
        if arch == "cnn"
        else LegacyNet(in_channels, num_classes)
    )
    return net.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
