"""Which value of a metric is better, and which values cannot rank a model (no MLflow here)."""
from __future__ import annotations

import math

LOWER_IS_BETTER_SUFFIX = "_loss"


def lower_is_better(metric: str) -> bool:
    """`*_loss` metrics are better when lower; every other metric (accuracies) when higher."""
    return metric.endswith(LOWER_IS_BETTER_SUFFIX)


def beats(value: float, other: float, metric: str) -> bool:
    """Strictly better: on a tie the current holder keeps its alias."""
    return value < other if lower_is_better(metric) else value > other


def invalid_metric_value(metric: str, value: float) -> str:
    """Why `value` cannot be a real `metric` ("" when it can): not finite, an accuracy outside
    [0, 1], a negative loss. Such a value would win (2.0) or never be beaten (NaN)."""
    if not math.isfinite(value):
        return f"its {metric} is {value}, not a finite number"
    if metric.endswith("_acc") and not 0.0 <= value <= 1.0:
        return f"its {metric} is {value}, outside [0, 1]"
    if lower_is_better(metric) and value < 0:
        return f"its {metric} is {value}, below 0"
    return ""
