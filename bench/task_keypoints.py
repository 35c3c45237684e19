"""The reference keypoints model (bench/task_models.py builds it): a CNN that finds the four
corners and the centre of a digit's box on a canvas (bench/task_data.keypoint_scenes), and says
which of them lie inside the image. Its output is (N, 5, 3): x, y in input pixels, then a sigmoid
visibility, the layout of a pose head with a confidence column."""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench.task_data import Labelled

KEYPOINTS = 5


class Keypointer(nn.Module):
    def __init__(self, size: int, width: int = 16):
        super().__init__()
        from bench.task_models import conv_bn

        self.size = size
        self.body = nn.Sequential(conv_bn(1, width, 2), conv_bn(width, 2 * width, 2), conv_bn(2 * width, 2 * width, 2))
        cells = (size // 8) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * cells, 64), nn.SiLU(), nn.Linear(64, KEYPOINTS * 3))

    def raw(self, x):
        """(N, K, 3): x, y in canvas sizes, visibility logit."""
        return self.head(self.body(x)).reshape(-1, KEYPOINTS, 3)

    def forward(self, x):
        raw = self.raw(x)
        return torch.cat([raw[:, :, :2] * self.size, torch.sigmoid(raw[:, :, 2:])], dim=2)


def train_keypointer(model: Keypointer, scenes: Labelled, *, epochs: int, fit, batch_size: int = 32, lr: float = 4e-3) -> Keypointer:
    """Smooth L1 on every keypoint's place (those outside the canvas too: their place is known),
    binary cross-entropy on whether it is inside. `fit` is task_models._fit."""
    truth = torch.from_numpy(scenes.labels["keypoints"].astype(np.float32))

    def loss_of(images, batch):
        raw, target = model.raw(images), truth[batch]
        place = F.smooth_l1_loss(raw[:, :, :2], target[:, :, :2] / model.size, beta=0.02)
        return place + 0.1 * F.binary_cross_entropy_with_logits(raw[:, :, 2], (target[:, :, 2] > 0).float())

    return fit(model, scenes.images, loss_of, epochs=epochs, batch_size=batch_size, lr=lr)
