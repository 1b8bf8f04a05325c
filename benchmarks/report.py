"""`report` of a study already in the store: its size, its build time, and its first printed pages as pictures.

    python benchmarks/report.py --run-id <sweep parent> [--reps 3] [--pages 1,11]

Each repetition runs `mnist-tracking report --run-id <id> --output <tmp>/study.html` as users do (a fresh
process), timed whole; the build's own time is the report run's metric report_seconds. Then prints the last page
with headless Chromium (--print-to-pdf) and renders the printed pages `--pages` with poppler's pdftoppm to
docs/report-page-<n>.png. Writes benchmarks/report.json and .md. Targets: at most 5 MB, at most 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from machine import cpu_model  # noqa: E402 (benchmarks/machine.py, beside this script)

MAX_BYTES, MAX_SECONDS = 5_000_000, 15
CHROMIUM = "/usr/bin/chromium"
PAGE_DPI = 70



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pages", default="1,11", help="comma list of printed pages to draw for the docs")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient
    from pypdf import PdfReader

    folder = Path(tempfile.mkdtemp(prefix="report-bench-"))
    output = folder / "study.html"
    reps = []
    for _ in range(args.reps):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "mnist_tracking", "report", "--run-id", args.run_id,
                                 "--output", str(output)], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        whole = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        run_id = result.stdout.split("/runs/")[-1].split("?")[0]
        metrics = MlflowClient().get_run(run_id).data.metrics
        reps.append({"report_run": run_id, "whole_seconds": round(whole, 2),
                     "build_seconds": round(metrics["report_seconds"], 2), "bytes": int(metrics["report_bytes"])})
    pdf = folder / "study.pdf"
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                    f"--print-to-pdf={pdf}", output.as_uri()], check=True, capture_output=True, timeout=300)
    pages = len(PdfReader(str(pdf)).pages)
    for number in (int(n) for n in args.pages.split(",")):
        subprocess.run(["pdftoppm", "-png", "-r", str(PAGE_DPI), "-f", str(number), "-l", str(number),
                        "-singlefile", str(pdf), str(REPO / "docs" / f"report-page-{number}")], check=True)
    results = {"date": str(date.today()), "cpu": cpu_model(), "cores": os.cpu_count(), "run_id": args.run_id,
               "reps": reps, "median_build_seconds": statistics.median(r["build_seconds"] for r in reps),
               "median_whole_seconds": statistics.median(r["whole_seconds"] for r in reps),
               "bytes": reps[-1]["bytes"], "printed_pages": pages}
    (HERE / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    text = (f"CPU: {results['cpu']}, {results['cores']} cores; {results['date']}\n\n"
            f"`mnist-tracking report --run-id {args.run_id}` (the full sweep), {args.reps} repetitions:\n\n"
            "| | measured | target |\n|---|---|---|\n"
            f"| page size | {results['bytes'] / 1e6:.2f} MB | at most {MAX_BYTES / 1e6:.0f} MB |\n"
            f"| build (report_seconds: read the runs, draw, log), median | "
            f"{results['median_build_seconds']:.1f} s | at most {MAX_SECONDS} s |\n"
            f"| the whole command (imports included), median | {results['median_whole_seconds']:.1f} s | |\n"
            f"| printed pages (Chromium, A4) | {pages} | |\n")
    (HERE / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
