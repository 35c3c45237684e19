"""Reference task models, ours and trained here on synthetic data (bench/task_data.py): a YOLO-style
anchor-free detector, a CRNN-style CTC recognizer, an encoder-decoder segmenter, an embedding
network and a keypoints model (bench/task_keypoints.py). Each is seeded, exported to ONNX with a dynamic batch, and comes with a labelled eval .npz,
an unlabelled calibration .npz and the task body a job gives. `tiny` trains in seconds (tests);
`bench` in a few minutes on 2 cores (bench/tasks.py), cached under bench/out/.

    python -m bench.task_models [--tiny] [--force]
"""

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench import task_data

DETECTOR_CLASSES = 10
TINY_ALPHABET = "0123456789"
BENCH_ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: too close to 1, 0 in some fonts


def conv_bn(channels_in: int, channels_out: int, stride=1, act=nn.SiLU, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride, 1, groups=groups, bias=False),
                         nn.BatchNorm2d(channels_out), act())


# --- detector --------------------------------------------------------------------------------------

class Detector(nn.Module):
    """Anchor-free, one stride: per grid cell, distances to the box's four sides (softplus, in
    strides) and class logits. `forward` is what Ultralytics exports: (N, 4+C, A), box rows xywh in
    input pixels, then sigmoid class scores."""

    def __init__(self, size: int, width: int = 16, classes: int = DETECTOR_CLASSES, depth: int = 2):
        super().__init__()
        self.stride = 4
        layers = [conv_bn(1, width, 2), conv_bn(width, 2 * width, 2)]
        layers += [conv_bn(2 * width, 2 * width) for _ in range(depth)]
        self.body = nn.Sequential(*layers)
        self.box = nn.Conv2d(2 * width, 4, 1)
        self.cls = nn.Conv2d(2 * width, classes, 1)
        nn.init.constant_(self.cls.bias, -4.0)  # start near "nothing here": most cells are background
        cells = size // self.stride
        ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
        self.register_buffer("centres", torch.stack([xs, ys]).reshape(2, -1).float().add(0.5).mul(self.stride))

    def raw(self, x):
        """(boxes xyxy (N, 4, A) in pixels, class logits (N, C, A))."""
        features = self.body(x)
        distances = F.softplus(self.box(features).flatten(2)) * self.stride  # left, top, right, bottom
        top_left = self.centres - distances[:, :2]
        bottom_right = self.centres + distances[:, 2:]
        return torch.cat([top_left, bottom_right], 1), self.cls(features).flatten(2)

    def forward(self, x):
        xyxy, logits = self.raw(x)
        xywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        return torch.cat([xywh, torch.sigmoid(logits)], 1)


def assign(centres: np.ndarray, scene: task_data.Labelled, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image and cell: the class of the box it is responsible for (-1: background) and that box.
    A cell is responsible for a box when its centre lies inside the box and within one stride of the
    box's centre on both axes (2x2 cells mostly); of two such boxes, the smaller wins."""
    anchors = centres.shape[1]
    stride = centres[0, 1] - centres[0, 0]
    classes = np.full((count, anchors), -1, np.int64)
    boxes = np.zeros((count, anchors, 4), np.float32)
    area_of = np.full((count, anchors), np.inf)
    labels = scene.labels
    for box, cls, image in zip(labels["boxes"], labels["box_classes"], labels["box_images"]):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        inside = ((centres[0] > box[0]) & (centres[0] < box[2]) & (centres[1] > box[1]) & (centres[1] < box[3])
                  & (np.abs(centres[0] - cx) < stride) & (np.abs(centres[1] - cy) < stride))
        area = (box[2] - box[0]) * (box[3] - box[1])
        take = inside & (area < area_of[image])
        classes[image, take], boxes[image, take], area_of[image, take] = cls, box, area
    return classes, boxes


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of paired xyxy boxes (K, 4)."""
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(1), (b[:, 2:] - b[:, :2]).prod(1)
    union = area_a + area_b - inter
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(1)
    return inter / union - (hull - union) / hull


def train_detector(model: Detector, scene: task_data.Labelled, *, epochs: int, batch_size: int = 32, lr: float = 4e-3) -> Detector:
    classes, boxes = assign(model.centres.numpy(), scene, len(scene.images))
    targets = torch.from_numpy(classes), torch.from_numpy(boxes)

    def loss_of(images, batch):
        xyxy, logits = model.raw(images)
        cls, box = targets[0][batch], targets[1][batch]
        positive = cls >= 0
        wanted = torch.zeros_like(logits)
        wanted[positive.nonzero(as_tuple=True)[0], cls[positive], positive.nonzero(as_tuple=True)[1]] = 1.0
        count = positive.sum().clamp(min=1)
        class_loss = F.binary_cross_entropy_with_logits(logits, wanted, reduction="sum") / count
        box_loss = (1 - giou(xyxy.transpose(1, 2)[positive], box[positive])).sum() / count
        return class_loss + 2.0 * box_loss

    return _fit(model, scene.images, loss_of, epochs=epochs, batch_size=batch_size, lr=lr)


# --- CTC recognizer --------------------------------------------------------------------------------

class SeparableBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, both with hard-swish (MobileNetV3's blocks, as PP-OCR uses)."""

    def __init__(self, channels_in: int, channels_out: int, stride):
        super().__init__()
        self.depthwise = conv_bn(channels_in, channels_in, stride, nn.Hardswish, groups=channels_in)
        self.pointwise = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out), nn.Hardswish())

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class Recognizer(nn.Module):
    """CRNN-style: a convolutional column encoder (height pooled away; T = width / 2: a step per few pixels, so
    that a repeated character has room for the blank CTC needs between its two copies), then a
    convolutional sequence model over the columns in place of the recurrent one (ONNX Runtime
    quantizes no LSTM statically, so a float LSTM would decide every int8 comparison), then
    per-step softmax over blank + alphabet: (N, T, C)."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        hidden = 3 * width // 2
        # Full convolutions first: depthwise ones from the start learned far slower (exact match
        # 0.09 after 12 epochs against 0.80 on the tiny lines).
        self.encoder = nn.Sequential(conv_bn(1, width // 2, 2, nn.Hardswish), conv_bn(width // 2, width, (2, 1), nn.Hardswish),
                                     SeparableBlock(width, hidden, (2, 1)), SeparableBlock(hidden, hidden, (2, 1)))
        self.sequence = nn.Sequential(nn.Conv1d(hidden, hidden, 3, padding=1), nn.Hardswish(),
                                      nn.Conv1d(hidden, hidden, 3, padding=1), nn.Hardswish())
        self.classifier = nn.Conv1d(hidden, classes, 1)

    def logits(self, x):
        columns = self.encoder(x).mean(dim=2)  # (N, C, T)
        return self.classifier(self.sequence(columns)).transpose(1, 2)  # (N, T, classes)

    def forward(self, x):
        return torch.softmax(self.logits(x), dim=-1)


def train_recognizer(model: Recognizer, lines: task_data.Labelled, *, epochs: int, batch_size: int = 32, lr: float = 3e-3) -> Recognizer:
    sequences = torch.from_numpy(lines.labels["label_sequences"])

    def loss_of(images, batch):
        log_probs = F.log_softmax(model.logits(images), dim=-1).transpose(0, 1)  # (T, N, C)
        wanted = sequences[batch]
        lengths = (wanted >= 0).sum(1)
        steps = torch.full((len(batch),), log_probs.shape[0], dtype=torch.long)
        return F.ctc_loss(log_probs, wanted.clamp(min=0), steps, lengths, blank=0, zero_infinity=True)

    # A constant rate: CTC first sits on a plateau (all blanks) that one-cycle's slow start and early
    # decay kept it on (exact match 0.08 against 0.80 with a constant 3e-3 on the tiny lines).
    return _fit(model, lines.images, loss_of, epochs=epochs, batch_size=batch_size, lr=lr, one_cycle=False)


# --- segmenter -------------------------------------------------------------------------------------

class Segmenter(nn.Module):
    """A small U-Net: two stride-2 stages down, nearest upsampling and skip concatenations back up;
    (N, C, H, W) logits."""

    def __init__(self, classes: int = len(task_data.SHAPES) + 1, width: int = 16):
        super().__init__()
        self.down0 = conv_bn(1, width, act=nn.ReLU)
        self.down1 = nn.Sequential(conv_bn(width, 2 * width, 2, nn.ReLU), conv_bn(2 * width, 2 * width, act=nn.ReLU))
        self.down2 = nn.Sequential(conv_bn(2 * width, 4 * width, 2, nn.ReLU), conv_bn(4 * width, 4 * width, act=nn.ReLU))
        self.up1 = conv_bn(6 * width, 2 * width, act=nn.ReLU)
        self.up0 = conv_bn(3 * width, width, act=nn.ReLU)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        skip0 = self.down0(x)
        skip1 = self.down1(skip0)
        y = self.up1(torch.cat([F.interpolate(self.down2(skip1), scale_factor=2.0, mode="nearest"), skip1], 1))
        y = self.up0(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), skip0], 1))
        return self.head(y)


def train_segmenter(model: Segmenter, scenes: task_data.Labelled, *, epochs: int, batch_size: int = 32, lr: float = 4e-3) -> Segmenter:
    masks = torch.from_numpy(scenes.labels["masks"].astype(np.int64))
    return _fit(model, scenes.images, lambda images, batch: F.cross_entropy(model(images), masks[batch]),
                epochs=epochs, batch_size=batch_size, lr=lr)


# --- embedder --------------------------------------------------------------------------------------

class Embedder(nn.Module):
    """A CNN whose output is an L2-normalised (N, D) embedding. Trained as a cosine classifier
    (NormFace: scaled cosine to learned class centres), so same-class items lie close on the sphere;
    the class centres are not exported."""

    def __init__(self, dimensions: int = 32, width: int = 16, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(conv_bn(1, width, act=nn.ReLU), conv_bn(width, 2 * width, 2, nn.ReLU),
                                  conv_bn(2 * width, 4 * width, 2, nn.ReLU))
        self.project = nn.Linear(4 * width, dimensions)
        self.centres = nn.Parameter(torch.randn(classes, dimensions))

    def forward(self, x):
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)
        return F.normalize(self.project(pooled), dim=1)

    def class_logits(self, x, scale: float = 16.0):
        return scale * self(x) @ F.normalize(self.centres, dim=1).T


def train_embedder(model: Embedder, images: np.ndarray, classes: np.ndarray, *, epochs: int, batch_size: int = 64, lr: float = 4e-3) -> Embedder:
    targets = torch.from_numpy(classes)
    return _fit(model, images, lambda batch_images, batch: F.cross_entropy(model.class_logits(batch_images), targets[batch]),
                epochs=epochs, batch_size=batch_size, lr=lr)


# --- shared ----------------------------------------------------------------------------------------

def _fit(model: nn.Module, images: np.ndarray, loss_of, *, epochs: int, batch_size: int, lr: float,
         one_cycle: bool = True) -> nn.Module:
    """AdamW over seeded shuffles, with a one-cycle schedule or a constant rate; `loss_of(images,
    batch indices)`."""
    inputs = torch.from_numpy(images.astype(np.float32) / 255.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(inputs) + batch_size - 1) // batch_size)
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps) if one_cycle
                 else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), batch_size):
            batch = order[start : start + batch_size]
            loss = loss_of(inputs[batch], batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def export_onnx(model: nn.Module, example: np.ndarray, path: Path, output_name: str) -> Path:
    sample = torch.from_numpy(example[:2].astype(np.float32) / 255.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=[output_name], dynamic_axes={"input": {0: "batch"}, output_name: {0: "batch"}})
    return path


@dataclass
class TaskModel:
    name: str
    task: dict  # the task body a job gives
    onnx: Path
    eval_npz: Path  # labelled, in the key layout of bench/task_data.py
    calib_npz: Path  # images only
    train_seconds: float

    def eval_data(self) -> dict[str, np.ndarray]:
        with np.load(self.eval_npz) as archive:
            return {key: archive[key] for key in archive.files}


CONFIGS = {
    # tiny: the tests' models, each under 20 s of one core.
    "tiny": {"detector": dict(size=32, scale=1, objects=2, train=1200, eval=200, epochs=12, width=16, depth=2),
             "recognizer": dict(height=16, width=64, alphabet=TINY_ALPHABET, length=4, train=2400, eval=200, epochs=10, channels=32),
             "segmenter": dict(size=32, shapes=2, train=500, eval=100, epochs=8, width=8),
             "embedder": dict(epochs=10, width=8, dimensions=16, pairs=400),
             "keypointer": dict(size=32, scale=2, train=2000, eval=200, epochs=12, width=16)},
    # bench: sized for a shared 2-core machine (about 3 CPU-minutes in all, one thread).
    "bench": {"detector": dict(size=64, scale=2, objects=4, train=2000, eval=400, epochs=10, width=16, depth=2),
              "recognizer": dict(height=16, width=96, alphabet=BENCH_ALPHABET, length=6, train=4000, eval=400, epochs=24, channels=32),
              "segmenter": dict(size=48, shapes=3, train=1200, eval=200, epochs=8, width=8),
              "embedder": dict(epochs=15, width=16, dimensions=32, pairs=2000),
              "keypointer": dict(size=48, scale=3, train=4000, eval=400, epochs=16, width=16)},
}
CALIBRATION = 128  # images in each calibration set (drawn from the training data)


def _build(name: str, config: dict, out: Path) -> tuple[dict, float]:
    """Train `name` and write its model.onnx, eval.npz, calib.npz; returns its task body and seconds."""
    torch.manual_seed(0)
    # One thread: on a shared machine two OpenMP threads wait on each other at every barrier while
    # the other is descheduled (minutes instead of seconds under load); one is also reproducible.
    torch.set_num_threads(1)
    started = time.perf_counter()
    (train_digits, train_classes), (test_digits, test_classes) = task_data.digit_images()
    if name == "detector":
        scene = dict(size=config["size"], scale=config["scale"], max_objects=config["objects"])
        training = task_data.detection_scenes(train_digits, train_classes, count=config["train"], seed=1, **scene)
        held_out = task_data.detection_scenes(test_digits, test_classes, count=config["eval"], seed=2, **scene)
        model = train_detector(Detector(config["size"], config["width"], depth=config["depth"]), training, epochs=config["epochs"])
        task = {"type": "detection", "decoder": {"kind": "yolo", "box_format": "xywh"}}
    elif name == "recognizer":
        lines = dict(height=config["height"], width=config["width"], alphabet=config["alphabet"], max_length=config["length"])
        training = task_data.text_lines(count=config["train"], seed=1, **lines)
        held_out = task_data.text_lines(count=config["eval"], seed=2, **lines)
        del held_out.labels["label_sequences"]  # the service takes one of the two: the texts, with the task's alphabet
        model = train_recognizer(Recognizer(len(config["alphabet"]) + 1, config["channels"]), training, epochs=config["epochs"])
        task = {"type": "ctc", "blank": 0, "alphabet": config["alphabet"]}
    elif name == "segmenter":
        scenes = dict(size=config["size"], max_shapes=config["shapes"])
        training = task_data.shape_scenes(count=config["train"], seed=1, **scenes)
        held_out = task_data.shape_scenes(count=config["eval"], seed=2, **scenes)
        model = train_segmenter(Segmenter(width=config["width"]), training, epochs=config["epochs"])
        task = {"type": "segmentation"}
    elif name == "embedder":
        training = task_data.Labelled(train_digits[:, None])
        pairs, same = task_data.verification_pairs(test_classes, count=config["pairs"], seed=2)
        held_out = task_data.Labelled(test_digits[:, None], {"pairs": pairs, "pair_same": same})
        model = train_embedder(Embedder(config["dimensions"], config["width"]), training.images, train_classes, epochs=config["epochs"])
        task = {"type": "embedding"}
    elif name == "keypointer":
        from bench.task_keypoints import Keypointer, train_keypointer

        scene = dict(size=config["size"], scale=config["scale"])
        training = task_data.keypoint_scenes(train_digits, count=config["train"], seed=1, **scene)
        held_out = task_data.keypoint_scenes(test_digits, count=config["eval"], seed=2, **scene)
        model = train_keypointer(Keypointer(config["size"], config["width"]), training, epochs=config["epochs"], fit=_fit)
        task = {"type": "keypoints", "layout": "points"}
    else:
        raise ValueError(f"no task model named {name}")
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, held_out.images, out / "model.onnx", "output")
    held_out.save(out / "eval.npz")
    training.save(out / "calib.npz", with_labels=False) if len(training.images) <= CALIBRATION else \
        task_data.Labelled(training.images[:CALIBRATION]).save(out / "calib.npz")
    (out / "task.json").write_text(json.dumps({"task": task, "train_seconds": seconds}))
    return task, seconds


NAMES = ("detector", "recognizer", "segmenter", "embedder")  # bench/tasks.py's table
ALL_NAMES = NAMES + ("keypointer",)


def build(name: str, size: str, out_root: Path, force: bool = False) -> TaskModel:
    """The trained model `name` of configuration `size`, from `out_root/<size>/<name>/` when cached."""
    out = out_root / size / name
    files = [out / f for f in ("model.onnx", "eval.npz", "calib.npz", "task.json")]
    if force or not all(f.is_file() for f in files):
        _build(name, CONFIGS[size][name], out)
    saved = json.loads((out / "task.json").read_text())
    return TaskModel(name, saved["task"], out / "model.onnx", out / "eval.npz", out / "calib.npz", saved["train_seconds"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="the tests' configuration")
    parser.add_argument("--only", choices=ALL_NAMES, action="append")
    parser.add_argument("--out", type=Path, default=Path("bench/out/task-models"))
    parser.add_argument("--force", action="store_true", help="train again even when cached")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.only or ALL_NAMES:
        model = build(name, "tiny" if args.tiny else "bench", args.out, args.force)
        print(f"{name}: trained in {model.train_seconds:.1f} s -> {model.onnx}")


if __name__ == "__main__":
    main()
