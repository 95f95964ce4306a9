"""Feedback, label quality, drift and metrics."""
