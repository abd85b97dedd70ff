"""Inference layer: the one Predictor (calibration included), evaluation, explanations, export."""
