"""Timing: samples of an operation in microseconds, and their median and p99."""

import statistics
import time


def sample(op, iterations, warmup=0, batch=1):
    """Microseconds per op(i), one sample per `batch` calls (for fast ops), after a warm-up."""
    samples = []
    for n in range(warmup + iterations):
        start = time.perf_counter_ns()
        for i in range(n * batch, (n + 1) * batch):
            op(i)
        if n >= warmup:
            samples.append((time.perf_counter_ns() - start) / batch / 1000)
    return samples


def summary(samples):
    """Median and p99."""
    return statistics.median(samples), statistics.quantiles(samples, n=100)[98]


def measure(op, iterations, batch=1):
    """Median and p99 in microseconds of op(i), after a warm-up (caches, first calls)."""
    return summary(sample(op, iterations, max(20, iterations // 10), batch))
