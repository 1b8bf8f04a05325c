"""TensorBoard projector export: pure functions from features, labels and a sprite to the files it reads."""

from __future__ import annotations

import io

import numpy as np

# `tensorboard --logdir <folder>` finds this file at the folder's top and opens its embeddings
# in the projector (no checkpoint needed: the tensor is a TSV file named in it).
CONFIG_FILE = "projector_config.pbtxt"
TENSORS_FILE = "features.tsv"  # (n, d): one point a line, d tab-separated numbers
METADATA_FILE = "metadata.tsv"  # a header line (more than one column), then one line a point
SPRITE_FILE = "sprite.png"
TENSOR_NAME = "features"
# Five significant digits: the projector's PCA/t-SNE/UMAP cannot tell them from float32's seven,
# and the 10,000 x 512 test features take 23 MB instead of 31 MB.
FLOAT_FORMAT = "%.5g"
METADATA_COLUMNS = ("label", "prediction", "correct", "index")


def tensors_tsv(features: np.ndarray) -> str:
    """features (n, d) as TSV: n lines of d tab-separated numbers, no header (the projector's tensor format)."""
    buffer = io.StringIO()
    np.savetxt(buffer, features, fmt=FLOAT_FORMAT, delimiter="\t")
    return buffer.getvalue()


def metadata_tsv(labels: np.ndarray, predictions: np.ndarray, indices: np.ndarray) -> str:
    """One line a point (same order as the tensor): true label, prediction, correct (yes/no), index,
    under a header line (the projector expects one when there is more than one column)."""
    lines = ["\t".join(METADATA_COLUMNS)]
    for label, prediction, index in zip(labels, predictions, indices, strict=True):
        lines.append(f"{label}\t{prediction}\t{'yes' if label == prediction else 'no'}\t{index}")
    return "\n".join(lines) + "\n"


def config_pbtxt(shape: tuple[int, int], thumb_side: int | None) -> str:
    """projector_config.pbtxt (text-format ProjectorConfig) with one embedding, paths relative to it;
    thumb_side: the sprite's cell size in pixels, None when there is no sprite."""
    lines = [
        "embeddings {",
        f'  tensor_name: "{TENSOR_NAME}"',
        f'  tensor_path: "{TENSORS_FILE}"',
        f"  tensor_shape: {shape[0]}",
        f"  tensor_shape: {shape[1]}",
        f'  metadata_path: "{METADATA_FILE}"',
    ]
    if thumb_side:
        lines += [
            "  sprite {",
            f'    image_path: "{SPRITE_FILE}"',
            f"    single_image_dim: {thumb_side}",  # width, then height
            f"    single_image_dim: {thumb_side}",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def export_files(
    features: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    indices: np.ndarray,
    sprite: bytes | None = None,
    thumb_side: int = 28,
) -> dict[str, bytes]:
    """{file name: content} of a TensorBoard projector folder for features (n, d), labels,
    predictions and indices (n,), and the sprite PNG of their thumbnails in the same order (or None)."""
    files = {
        CONFIG_FILE: config_pbtxt(features.shape, thumb_side if sprite else None).encode(),
        TENSORS_FILE: tensors_tsv(features).encode(),
        METADATA_FILE: metadata_tsv(labels, predictions, indices).encode(),
    }
    if sprite:
        files[SPRITE_FILE] = sprite
    return files
