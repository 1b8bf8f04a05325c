"""The README's figures of `benchmarks/evolution.json`: what alignment buys, and that it invents nothing.

    python benchmarks/evolution_figures.py [--results benchmarks/evolution.json] [--out docs]
    MLFLOW_TRACKING_URI=... python benchmarks/evolution_figures.py --evolution-run <evolution run id> [--method tsne]

Writes, from the numbers `benchmarks/evolution.py` measured on a real run's snapshots:
- evolution-alignment.png: per method, how far the points move from one frame to the next
  (mean displacement in units of the layout's RMS spread) for the aligned layouts, for independent
  layouts (as `project` draws each epoch) and for independent layouts rotated onto each other;
- evolution-quality.png: per method, each frame's kNN accuracy, aligned against independent.

With --evolution-run, also what that `evolution` run logged for --method, as it logged it:
- evolution-<method>.gif: its evolution/<method>.gif;
- evolution-<method>-strip.png: its frames (the image key evolution_<method>) side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no backend, no global figure state
from matplotlib.ticker import MaxNLocator

TITLES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
DPI = 110


def alignment_figure(report: dict) -> Figure:
    methods = [m for m in ("pca", "tsne") if "displacements_aligned" in report["methods"].get(m, {}).get(
        "alignment_on_real_snapshots", {})]
    figure = Figure(figsize=(5.5 * len(methods), 3.6))
    axes = figure.subplots(1, len(methods), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        a = report["methods"][method]["alignment_on_real_snapshots"]
        epochs = range(1, len(a["displacements_aligned"]))
        ax.plot(epochs, a["displacements_independent"][1:], "o-", color="tab:red", label="independent layouts")
        ax.plot(epochs, a["displacements_independent_procrustes"][1:], "s-", color="tab:orange",
                label="independent, then rotated (Procrustes)")
        ax.plot(epochs, a["displacements_aligned"][1:], "^-", color="tab:blue", label="aligned (evolution)")
        ax.set(title=f"{TITLES[method]}: how far points move between frames", xlabel="epoch (from the one before)",
               ylabel="mean displacement (x RMS spread)")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"run {report['run_id'][:8]}: {report['points']:,} val points, {report['frames']} frames "
                    f"({report['cpu']}, {report['cores']} cores)", fontsize=9)
    figure.tight_layout()
    return figure


def quality_figure(report: dict) -> Figure:
    methods = [m for m in ("pca", "tsne") if m in report["methods"]]
    figure = Figure(figsize=(5.5 * len(methods), 3.6))
    axes = figure.subplots(1, len(methods), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        a = report["methods"][method]["alignment_on_real_snapshots"]
        epochs = range(len(a["knn_aligned"]))
        ax.plot(epochs, a["knn_independent"], "o-", color="tab:red", label="independent embedding of the epoch")
        ax.plot(epochs, a["knn_aligned"], "^-", color="tab:blue", label="aligned frame (evolution)")
        ax.set(title=f"{TITLES[method]}: kNN accuracy of each frame (largest gap {a['knn_delta_max_abs']:.3f})",
               xlabel="epoch (0 = initialised network)", ylabel="10-NN accuracy of the true digit")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def frame_strip(run_id: str, method: str, out: Path) -> None:
    """The run's GIF, and its logged frames (full-size PNGs, not MLflow's compressed previews) in a row."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient()
    frame = re.compile(rf"images/evolution_{method}\+step\+(\d+)\+.*(?<!compressed)\.png$")
    with tempfile.TemporaryDirectory() as tmp:
        gif = Path(client.download_artifacts(run_id, f"evolution/{method}.gif", tmp))
        (out / f"evolution-{method}.gif").write_bytes(gif.read_bytes())
        steps = {int(m.group(1)): a.path for a in client.list_artifacts(run_id, "images") if (m := frame.match(a.path))}
        images = [Image.open(client.download_artifacts(run_id, steps[s], tmp)).convert("RGB") for s in sorted(steps)]
    strip = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width
    strip.save(out / f"evolution-{method}-strip.png")  # RGB, not a palette: the digits' colours stay apart
    print(out / f"evolution-{method}.gif", out / f"evolution-{method}-strip.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(Path(__file__).with_name("evolution.json")))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--evolution-run", default="", help="an `evolution` run: copy its GIF and frames too")
    parser.add_argument("--method", default="tsne")
    args = parser.parse_args()
    report = json.loads(Path(args.results).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, build in (("evolution-alignment.png", alignment_figure), ("evolution-quality.png", quality_figure)):
        figure = build(report)
        figure.savefig(out / name, dpi=DPI)  # a full-colour (RGBA) PNG: the digits' colours stay apart
        print(out / name)
    if args.evolution_run:
        frame_strip(args.evolution_run, args.method, out)


if __name__ == "__main__":
    main()
