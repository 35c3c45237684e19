"""Small reference CNNs trained on real data that installs offline, exported as ONNX, .pt2 and
TorchScript. Tests use the tiny digits versions (seconds to train); benchmarks the full ones.

    python -m bench.reference --dataset digits --out bench/out   # or --dataset fashion
"""

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


class ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-style: a stem, residual stages with additions, global pooling, a linear head."""

    def __init__(self, widths=(16, 32, 64), in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, previous = [], widths[0]
        for index, width in enumerate(widths):
            stages.append(ResidualBlock(previous, width, 1 if index == 0 else 2))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(previous, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class MobileBlock(nn.Module):
    """Inverted residual: expand 1x1, depthwise 3x3, squeeze-excite, project 1x1."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = channels_in * expand
        self.expand = nn.Sequential(nn.Conv2d(channels_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.se = SqueezeExcite(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out))
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetSmall(nn.Module):
    def __init__(self, widths=(16, 24, 32), in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU6())
        blocks, previous = [], widths[0]
        for index, width in enumerate(widths):
            blocks.append(MobileBlock(previous, width, 1 if index == 0 else 2))
            blocks.append(MobileBlock(width, width, 1))
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass
class Split:
    images: np.ndarray  # uint8, N x 1 x H x W
    labels: np.ndarray  # int64


def load_digits_split(seed: int = 0) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)[:, None]
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], digits.target[order].astype(np.int64)
    cut = int(len(images) * 0.8)
    return Split(images[:cut], labels[:cut]), Split(images[cut:], labels[cut:])


def _read_idx(path: Path) -> np.ndarray:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_split() -> tuple[Split, Split]:
    def find(stem: str) -> Path:
        matches = sorted(FASHION_DIR.rglob(f"{stem}*"))
        if not matches:
            raise FileNotFoundError(f"{stem} not found under {FASHION_DIR}: apt-get install dataset-fashion-mnist")
        return matches[0]

    train = Split(_read_idx(find("train-images"))[:, None].copy(), _read_idx(find("train-labels")).astype(np.int64))
    test = Split(_read_idx(find("t10k-images"))[:, None].copy(), _read_idx(find("t10k-labels")).astype(np.int64))
    return train, test


def train(model: nn.Module, split: Split, *, epochs: int, lr: float = 3e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    images = torch.from_numpy(split.images.astype(np.float32) / 255.0)
    labels = torch.from_numpy(split.labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * ((len(images) + batch_size - 1) // batch_size))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def export_all(model: nn.Module, example: np.ndarray, out_dir: Path, name: str) -> dict[str, Path]:
    """ONNX (dynamic batch), torch.export archive and TorchScript of the same trained model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = torch.from_numpy(example[:2].astype(np.float32) / 255.0)
    paths = {"onnx": out_dir / f"{name}.onnx", "pt2": out_dir / f"{name}.pt2", "torchscript": out_dir / f"{name}.ts.pt"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample,), str(paths["onnx"]), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.export.save(torch.export.export(model, (sample,), dynamic_shapes={"x": {0: batch}}), str(paths["pt2"]))
        torch.jit.save(torch.jit.trace(model, sample), str(paths["torchscript"]))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["digits", "fashion"], default="digits")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--force", action="store_true", help="train again even if the exports are cached in --out")
    parser.add_argument("--small", action="store_true",
                        help="one narrow ResNet, 4 epochs (the tests' model, seconds on a CPU): a model to try the service with")
    args = parser.parse_args(argv)
    train_split, test_split = load_digits_split() if args.dataset == "digits" else load_fashion_split()
    epochs = args.epochs or (4 if args.small else 15 if args.dataset == "digits" else 3)
    torch.manual_seed(0)
    models = (("resnet", ResNetSmall(widths=(8, 16, 32))),) if args.small else (("resnet", ResNetSmall()), ("mobilenet", MobileNetSmall()))
    for name, model in models:
        cached = [args.out / f"{name}-{args.dataset}{suffix}" for suffix in (".onnx", ".pt2", ".ts.pt")]
        if not args.force and all(p.is_file() for p in cached):
            print(f"{name}-{args.dataset}: cached in {args.out} (--force to train again)")
            continue
        train(model, train_split, epochs=epochs)
        with torch.no_grad():
            logits = model(torch.from_numpy(test_split.images.astype(np.float32) / 255.0))
        accuracy = float((logits.argmax(1).numpy() == test_split.labels).mean())
        paths = export_all(model, test_split.images, args.out, f"{name}-{args.dataset}")
        print(f"{name}-{args.dataset}: test accuracy {accuracy:.4f}; " + ", ".join(str(p) for p in paths.values()))
    np.savez(args.out / f"{args.dataset}-test.npz", images=test_split.images, labels=test_split.labels)
    np.savez(args.out / f"{args.dataset}-calib.npz", images=train_split.images[:512])


if __name__ == "__main__":
    main()
