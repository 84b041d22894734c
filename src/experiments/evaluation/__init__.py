"""Evaluating a model once on held-out images: metrics with bootstrap intervals, operating point
and temperature chosen on validation, tables, figures and Grad-CAM overlays."""
