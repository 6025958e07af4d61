"""Train two tiny digit classifiers and export them to ONNX as test fixtures.

The models are small enough to train in seconds on a CPU and to commit to the repository, yet they
contain the two shapes of site that onnxsvd rewrites:

- ``digits_mlp.onnx``: an MLP 64→256→256→10 whose Linear layers export as ``Gemm`` with
  ``transB=1`` (weight stored ``[N, K]``).
- ``digits_vit.onnx``: a tiny ViT-like transformer whose Linear layers act on 3-D activations and
  therefore export as ``MatMul`` with a constant ``[K, N]`` initializer (+ ``Add`` for the bias).

Data is scikit-learn's digits set (1797 images of 8x8 pixels, values 0..16, scaled to [0, 1]), split
deterministically into 1000 training images, a calibration set and an evaluation set.

Run ``python tools/make_digits_models.py`` to regenerate everything under ``models/``.
"""

from __future__ import annotations

__all__ = [
    "DigitsMlp",
    "DigitsVit",
    "DigitsSplit",
    "load_digits_split",
    "train_classifier",
    "export_classifier",
    "count_constant_weight_matmuls",
    "main",
]

import argparse
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPOSITORY_ROOT / "models"
SEED = 0
N_TRAIN = 1000
N_CALIB = 256
OPSET = 17


@dataclass(frozen=True)
class DigitsSplit:
    """The digits data split into train / calibration / evaluation parts.

    Images are float32 ``[n, 64]`` in ``[0, 1]``; labels are int64 ``[n]``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    calib_images: np.ndarray
    calib_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray


def load_digits_split(n_train: int = N_TRAIN, n_calib: int = N_CALIB, seed: int = SEED) -> DigitsSplit:
    """Load scikit-learn's digits and split them with a fixed permutation.

    Args:
        n_train: images used for training.
        n_calib: images for calibration, taken after the training images; the rest is evaluation.
        seed: seed of the permutation.

    Returns:
        The split; the same for the same arguments on every run.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)  # [1797, 64] in [0, 1]
    labels = digits.target.astype(np.int64)  # [1797]
    order = np.random.RandomState(seed).permutation(len(images))
    train, calib, evaluation = np.split(order, [n_train, n_train + n_calib])
    return DigitsSplit(
        train_images=images[train],
        train_labels=labels[train],
        calib_images=images[calib],
        calib_labels=labels[calib],
        eval_images=images[evaluation],
        eval_labels=labels[evaluation],
    )


class DigitsMlp(nn.Module):
    """MLP 64→256→256→10 with ReLU; every Linear sees 2-D input and exports as Gemm."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, 64]`` pixels to ``[batch, 10]`` logits."""
        return self.layers(images)


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit q/k/v/out projections (each a MatMul site)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        # [B, T, D] -> [B, H, T, D/H]
        return tokens.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attend over ``[batch, tokens, dim]`` and return the same shape."""
        batch, length, dim = tokens.shape
        query = self._split_heads(self.query(tokens))  # [B, H, T, D/H]
        key = self._split_heads(self.key(tokens))  # [B, H, T, D/H]
        value = self._split_heads(self.value(tokens))  # [B, H, T, D/H]
        scores = query @ key.transpose(-2, -1) / math.sqrt(self.head_dim)  # [B, H, T, T]
        mixed = scores.softmax(dim=-1) @ value  # [B, H, T, D/H]
        return self.out(mixed.transpose(1, 2).reshape(batch, length, dim))  # [B, T, D]


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transform ``[batch, tokens, dim]``."""
        tokens = tokens + self.attention(self.attention_norm(tokens))
        return tokens + self.mlp(self.mlp_norm(tokens))


class DigitsVit(nn.Module):
    """Tiny ViT: 16 patches of 2x2 pixels, dim 64, 2 blocks of 4 heads, mean pool, linear head."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128) -> None:
        super().__init__()
        self.patch_size = 2
        n_patches = (8 // self.patch_size) ** 2
        self.patch_embedding = nn.Linear(self.patch_size**2, dim)
        self.position_embedding = nn.Parameter(torch.randn(1, n_patches, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, 64]`` pixels to ``[batch, 10]`` logits."""
        size, patch = 8, self.patch_size
        grid = size // patch
        # [B, 64] -> [B, rows, patch, cols, patch] -> [B, rows, cols, patch, patch] -> [B, 16, 4]
        patches = images.reshape(-1, grid, patch, grid, patch).permute(0, 1, 3, 2, 4)
        patches = patches.reshape(-1, grid * grid, patch * patch)
        tokens = self.patch_embedding(patches) + self.position_embedding  # [B, 16, D]
        tokens = self.norm(self.blocks(tokens))  # [B, 16, D]
        return self.head(tokens.mean(dim=1))  # [B, 10]


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    learning_rate: float,
    batch_size: int = 50,
    seed: int = SEED,
) -> nn.Module:
    """Train ``model`` with AdamW and cross-entropy; deterministic for a given seed.

    Args:
        model: the classifier, ``[batch, 64] -> [batch, 10]``.
        images: float32 ``[n, 64]``.
        labels: int64 ``[n]``.
        epochs: passes over the data.
        learning_rate: peak learning rate of a cosine schedule.
        batch_size: minibatch size.
        seed: seed of the minibatch order.

    Returns:
        The same model, trained and in eval mode.
    """
    inputs = torch.from_numpy(images)
    targets = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(inputs) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
    )
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        for start in range(0, len(inputs), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_function(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
        logger.debug("epoch %d loss %.4f", epoch, total_loss / len(inputs))
    model.eval()
    return model


def torch_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` in torch on float32 ``[n, 64]`` images and int64 ``[n]`` labels."""
    with torch.no_grad():
        predictions = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return float((predictions == labels).mean())


def export_classifier(model: nn.Module, path: Path) -> None:
    """Export ``model`` to ONNX (opset 17, legacy exporter) with input ``input`` and output ``logits``.

    The batch axis is dynamic. Constant folding is on so that the weights of 3-D Linear layers are
    stored pre-transposed as ``[K, N]`` initializers feeding MatMul directly.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 64, dtype=torch.float32)
    with warnings.catch_warnings():
        # The legacy TorchScript exporter is deprecated but gives the cleaner graph we want here.
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


def count_constant_weight_matmuls(path: Path) -> dict[str, int]:
    """Count MatMul nodes whose second input is an initializer, and Gemm nodes, in an ONNX file."""
    import onnx

    model = onnx.load(str(path))
    initializers = {initializer.name for initializer in model.graph.initializer}
    counts = {"MatMul": 0, "MatMul_constant_weight": 0, "Gemm": 0}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            counts["MatMul"] += 1
            if len(node.input) > 1 and node.input[1] in initializers:
                counts["MatMul_constant_weight"] += 1
        elif node.op_type == "Gemm":
            counts["Gemm"] += 1
    return counts


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier run by ONNX Runtime on CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": images})
    return float((logits.argmax(axis=1) == labels).mean())


def write_readme(output_dir: Path, split: DigitsSplit, accuracies: dict[str, float]) -> None:
    """Write ``models/README.md`` describing the files and the measured accuracies."""
    mlp_accuracy = accuracies["digits_mlp.onnx"]
    vit_accuracy = accuracies["digits_vit.onnx"]
    n_calib, n_eval = len(split.calib_labels), len(split.eval_labels)
    text = f"""# Test models

Small ONNX models and data used by the tests and examples. Regenerate everything here with

```
python tools/make_digits_models.py
```

(seeded: reruns give the same weights; a few seconds on a CPU). The data is scikit-learn's digits set
(8x8 images, 10 classes), pixels scaled to [0, 1] and flattened to 64 values, split with a fixed
permutation into {len(split.train_labels)} training, {n_calib} calibration and {n_eval} evaluation images.

- `digits_mlp.onnx`: MLP 64→256→256→10 (ReLU). Input `input` float32 [batch, 64], output `logits`
  [batch, 10]. Its three Linear layers are `Gemm` nodes with `transB=1` (weight stored [N, K]).
  Eval accuracy {mlp_accuracy:.4f}.
- `digits_vit.onnx`: tiny ViT: 16 patches of 2x2 pixels, dim 64, learned positions, 2 pre-norm blocks
  (4 heads, q/k/v/out projections, MLP 64→128→64 with GELU), mean pool, linear head. Same input and
  output. Its 13 Linear layers on 3-D activations are `MatMul` with a constant [K, N] initializer
  followed by `Add(bias, ·)`; the head is a `Gemm`. Eval accuracy {vit_accuracy:.4f}.
- `digits_calib.npz`: key `input` float32 [{n_calib}, 64], calibration images (disjoint from train
  and eval).
- `digits_eval.npz`: keys `input` float32 [{n_eval}, 64] and `labels` int64 [{n_eval}].

Accuracy of any of these models (or a rewritten one):

```
python tools/digits_accuracy.py models/digits_mlp.onnx models/digits_vit.onnx --data models/digits_eval.npz
```

The text model (all-MiniLM-L6-v2) is too large to commit: `python tools/export_minilm.py` writes it and
its tokenised calibration/evaluation sentences to `build/minilm/`.
"""
    # The character CNN's section is written by hand (tools/make_char_cnn.py does not own this file): keep it.
    readme = output_dir / "README.md"
    if readme.exists():
        old_text = readme.read_text(encoding="utf-8")
        marker = "\n## Character CNN"
        if marker in old_text:
            text += old_text[old_text.index(marker) :]
    (output_dir / "README.md").write_text(text, encoding="utf-8")


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Train, export and evaluate both digit classifiers; write data and README into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUTPUT_DIR, help="output folder (default: models/)"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log per-epoch losses")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.INFO, format="%(message)s")

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    output_dir: Path = arguments.out
    output_dir.mkdir(parents=True, exist_ok=True)

    split = load_digits_split()
    np.savez(output_dir / "digits_calib.npz", input=split.calib_images)
    np.savez(output_dir / "digits_eval.npz", input=split.eval_images, labels=split.eval_labels)

    recipes: dict[str, tuple[nn.Module, int, float]] = {
        "digits_mlp.onnx": (DigitsMlp(), 30, 3e-3),
        "digits_vit.onnx": (DigitsVit(), 60, 3e-3),
    }
    accuracies: dict[str, float] = {}
    for filename, (model, epochs, learning_rate) in recipes.items():
        torch.manual_seed(SEED)
        train_classifier(model, split.train_images, split.train_labels, epochs, learning_rate)
        path = output_dir / filename
        export_classifier(model, path)
        accuracy = onnx_accuracy(path, split.eval_images, split.eval_labels)
        reference = torch_accuracy(model, split.eval_images, split.eval_labels)
        if abs(accuracy - reference) > 1e-9:
            logger.warning("%s: ONNX accuracy %.4f differs from torch %.4f", filename, accuracy, reference)
        counts = count_constant_weight_matmuls(path)
        logger.info(
            "%s: %d bytes, %d MatMul (%d with a constant weight), %d Gemm",
            filename,
            path.stat().st_size,
            counts["MatMul"],
            counts["MatMul_constant_weight"],
            counts["Gemm"],
        )
        accuracies[filename] = accuracy

    vit_counts = count_constant_weight_matmuls(output_dir / "digits_vit.onnx")
    if vit_counts["MatMul_constant_weight"] < 10:
        logger.error(
            "digits_vit.onnx has only %d constant-weight MatMuls, expected 13",
            vit_counts["MatMul_constant_weight"],
        )
        return 1
    write_readme(output_dir, split, accuracies)
    for filename, accuracy in accuracies.items():
        shown = display_path(output_dir / filename)
        print(f"{shown}  accuracy {accuracy:.4f}  ({len(split.eval_labels)} samples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
