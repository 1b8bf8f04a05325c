"""The ten digit classes: how many there are and the one palette every figure and view draws them in."""

NUM_CLASSES = 10
# matplotlib's "tab10" as hex, one colour per digit 0-9: the PNGs (plots) and the HTML views (views) share it.
DIGIT_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
