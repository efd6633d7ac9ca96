"""Evaluation wing: metrics, thresholds, label statistics, the evaluator registry and the jobs that
use it (evaluate, predict, report). Nothing here imports the training job."""
