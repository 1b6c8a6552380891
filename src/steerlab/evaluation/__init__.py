"""Evaluation: behaviour metrics, judges, sweeps, policy comparison, plots and the demo."""
