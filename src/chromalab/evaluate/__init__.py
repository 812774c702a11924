"""The evaluate stage: per-photo metrics, their summary against the gray floor, and the figures."""
