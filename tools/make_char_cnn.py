"""Build a 20-class character image task offline, train a small ResNet on it and export it to ONNX.

The task: the ten digits ``0``–``9`` and the letters ``A``–``J``, rendered with PIL in the DejaVu
fonts found on this machine (or PIL's built-in font at several sizes when none is found), at random
sizes, rotations, shifts, stroke widths, contrasts and background levels, with Gaussian noise and a
random distractor line, as 32×32 grayscale images in ``[0, 1]`` (rounded to 8-bit levels).

The model: a ResNet-20-like CNN for 32×32 inputs (a 3×3 stem of stride 2, three stages of three basic
blocks at widths 16, 32, 64, global average pool, linear head), trained with SGD + momentum on CPU,
seeded. The strided stem runs the stages at 16, 8 and 4 pixels (a quarter of CIFAR ResNet-20's FLOPs),
so that training takes minutes on two shared cores. The exporter folds
each BatchNorm into its Conv, so the graph holds 21 Conv nodes with constant weights (19 of them 3×3)
and one Gemm head.

Writes into ``--out`` (default ``models/``):

- ``chars_resnet.onnx``: input ``input`` float32 ``[batch, 1, 32, 32]``, output ``logits``
  ``[batch, 20]``; opset 17, dynamic batch;
- ``chars_calib.npz``: key ``input`` float32 ``[512, 1, 32, 32]`` (calibration images, disjoint from
  training and evaluation) and ``labels`` int64 ``[512]`` (for fine-tuning or checks);
- ``chars_eval.npz``: keys ``input`` float32 ``[2000, 1, 32, 32]`` and ``labels`` int64 ``[2000]``;
- ``chars_resnet.json``: the recipe and the measured accuracies (read back by the tests).

Run ``python tools/make_char_cnn.py`` (about five minutes on a busy two-core machine: one minute of
rendering, four of training). Reruns on the same machine and library versions give the same files: data
comes from seeded generators, training runs on one torch thread with
``torch.use_deterministic_algorithms(True)`` (one thread is also faster than two on a shared machine).
"""

from __future__ import annotations

__all__ = [
    "CLASSES",
    "CharResNet",
    "CharTask",
    "find_fonts",
    "render_characters",
    "make_task",
    "train_model",
    "export_model",
    "onnx_accuracy",
    "main",
]

import argparse
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPOSITORY_ROOT / "models"
FONT_DIRECTORIES = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
#: The 20 classes, in label order.
CLASSES = "0123456789ABCDEFGHIJ"
IMAGE_SIZE = 32
SEED = 0
N_TRAIN = 8000
N_CALIB = 512
N_EVAL = 2000
EPOCHS = 4
BATCH_SIZE = 64
LEARNING_RATE = 0.05
THREADS = 1
OPSET = 17


def find_fonts() -> tuple[str, ...]:
    """Paths of the TrueType fonts below the system font folders, sorted (so the order is stable).

    Math and symbol-only fonts are left out: they do not draw Latin letters as text fonts do.
    """
    fonts: list[str] = []
    for directory in FONT_DIRECTORIES:
        if directory.is_dir():
            fonts.extend(str(path) for path in directory.rglob("*.ttf") if "Math" not in path.name)
    return tuple(sorted(fonts))


def _font(fonts: tuple[str, ...], index: int, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if fonts:
        return ImageFont.truetype(fonts[index % len(fonts)], size)
    return ImageFont.load_default(size=size)


def render_characters(
    labels: np.ndarray, fonts: tuple[str, ...], seed: int, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Render one augmented character per label.

    Args:
        labels: int64 ``[n]`` indices into :data:`CLASSES`.
        fonts: font files to pick from (PIL's built-in font when empty).
        seed: seed of every random choice; the same arguments give the same images.
        size: side of the square output image in pixels.

    Returns:
        float32 ``[n, 1, size, size]`` in ``[0, 1]``, rounded to multiples of 1/255.
    """
    rng = np.random.default_rng(seed)
    canvas = 2 * size  # draw large, rotate, then crop the centre and downsample
    images = np.empty((len(labels), 1, size, size), dtype=np.float32)
    n_fonts = max(len(fonts), 1)
    for index, label in enumerate(labels):
        font = _font(fonts, int(rng.integers(n_fonts)), int(rng.integers(26, 46)))
        image = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(image)
        text = CLASSES[int(label)]
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        shift_x, shift_y = rng.integers(-7, 8, size=2)
        origin = (
            (canvas - (right - left)) / 2 - left + shift_x,
            (canvas - (bottom - top)) / 2 - top + shift_y,
        )
        stroke = int(rng.integers(0, 2))
        draw.text(origin, text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        if rng.random() < 0.5:  # a distractor stroke across the image
            x0, y0, x1, y1 = rng.integers(0, canvas, size=4)
            draw.line((int(x0), int(y0), int(x1), int(y1)), fill=int(rng.integers(80, 200)), width=2)
        image = image.rotate(float(rng.uniform(-18, 18)), resample=Image.Resampling.BILINEAR)
        image = image.resize((size, size), resample=Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0  # [size, size]
        foreground, background = rng.uniform(0.55, 1.0), rng.uniform(0.0, 0.35)
        pixels = background + (foreground - background) * pixels
        pixels = pixels + rng.normal(0.0, rng.uniform(0.02, 0.15), size=pixels.shape)
        images[index, 0] = np.round(np.clip(pixels, 0.0, 1.0) * 255.0) / 255.0
    return images


@dataclass(frozen=True)
class CharTask:
    """The rendered task: images float32 ``[n, 1, 32, 32]`` in ``[0, 1]``, labels int64 ``[n]``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    calib_images: np.ndarray
    calib_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray


def make_task(fonts: tuple[str, ...], seed: int = SEED) -> CharTask:
    """Render the train, calibration and evaluation sets, each from its own seed (so they are disjoint draws)."""
    parts = []
    for offset, count in enumerate((N_TRAIN, N_CALIB, N_EVAL)):
        labels = np.arange(count, dtype=np.int64) % len(CLASSES)
        labels = np.random.default_rng(seed + 100 + offset).permutation(labels)
        parts.append((render_characters(labels, fonts, seed=seed + offset), labels))
    (train, train_labels), (calib, calib_labels), (evaluation, eval_labels) = parts
    return CharTask(train, train_labels, calib, calib_labels, evaluation, eval_labels)


class BasicBlock(nn.Module):
    """Two 3×3 Conv-BN layers with a shortcut (a strided 1×1 Conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, N, H/stride, W/stride]``."""
        hidden = torch.relu(self.bn1(self.conv1(features)))
        return torch.relu(self.bn2(self.conv2(hidden)) + self.shortcut(features))


class CharResNet(nn.Module):
    """ResNet-20-like: 3×3 stride-2 stem, stages of ``blocks`` basic blocks at ``widths``, pool, linear head."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 3, classes: int = 20) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        )
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 32, 32]`` pixels in ``[0, 1]`` → ``[B, classes]`` logits."""
        features = self.stages(torch.relu(self.stem(images - 0.5)))  # [B, 64, 4, 4]
        return self.head(features.mean(dim=(2, 3)))  # [B, classes]


def train_model(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int = SEED) -> nn.Module:
    """Train with SGD (momentum 0.9, Nesterov, weight decay 5e-4) under a one-cycle schedule; seeded.

    Returns:
        The same model, trained and in eval mode.
    """
    inputs = torch.from_numpy(images)
    targets = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(inputs) / BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch, pct_start=0.25
    )
    loss_function = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for epoch in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(inputs), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(inputs), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            logits = model(inputs[batch])
            loss = loss_function(logits, targets[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(dim=1) == targets[batch]).sum())
        logger.info(
            "epoch %d: loss %.4f, train accuracy %.4f (%.0f s)",
            epoch,
            total_loss / len(inputs),
            correct / len(inputs),
            time.perf_counter() - started,
        )
    model.eval()
    return model


def export_model(model: nn.Module, path: Path) -> None:
    """Export to ONNX (opset 17, TorchScript exporter, BatchNorm folded into Conv), dynamic batch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of an ONNX classifier run by ONNX Runtime on CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for start in range(0, len(images), batch_size):
        (logits,) = session.run(["logits"], {"input": images[start : start + batch_size]})
        correct += int((logits.argmax(axis=1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def main(argv: list[str] | None = None) -> int:
    """Render the task, train, export, evaluate; write the model, data and recipe into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT_DIR, help="output folder (default: models/)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    output_dir: Path = arguments.out
    output_dir.mkdir(parents=True, exist_ok=True)

    fonts = find_fonts()
    logger.info("%d fonts%s", len(fonts), "" if fonts else " (none found: PIL's built-in font)")
    started = time.perf_counter()
    task = make_task(fonts)
    rendered = len(task.train_labels) + N_CALIB + N_EVAL
    logger.info("rendered %d images in %.0f s", rendered, time.perf_counter() - started)
    np.savez_compressed(output_dir / "chars_calib.npz", input=task.calib_images, labels=task.calib_labels)
    np.savez_compressed(output_dir / "chars_eval.npz", input=task.eval_images, labels=task.eval_labels)

    model = CharResNet()
    started = time.perf_counter()
    train_model(model, task.train_images, task.train_labels, arguments.epochs)
    training_seconds = time.perf_counter() - started
    path = output_dir / "chars_resnet.onnx"
    export_model(model, path)
    accuracy = onnx_accuracy(path, task.eval_images, task.eval_labels)
    calib_accuracy = onnx_accuracy(path, task.calib_images, task.calib_labels)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    recipe = {
        "classes": CLASSES,
        "fonts": [Path(font).name for font in fonts],
        "image_size": IMAGE_SIZE,
        "n_train": N_TRAIN,
        "n_calib": N_CALIB,
        "n_eval": N_EVAL,
        "epochs": arguments.epochs,
        "torch_parameters": parameters,
        "training_seconds": round(training_seconds, 1),
        "eval_accuracy": accuracy,
        "calib_accuracy": calib_accuracy,
        "torch_version": torch.__version__,
    }
    (output_dir / "chars_resnet.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    print(f"{path}  eval accuracy {accuracy:.4f} ({N_EVAL} images), calib {calib_accuracy:.4f}, "
          f"{parameters} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
