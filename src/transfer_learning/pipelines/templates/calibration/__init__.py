"""Calibrating a strategy's image model under its namespace: every strategy ends with it."""

from .pipeline import calibration_pipeline

__all__ = ["calibration_pipeline"]
