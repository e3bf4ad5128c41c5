"""The benchmark harness: timing, quality metrics, baselines, reports."""
