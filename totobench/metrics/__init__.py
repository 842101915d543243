"""Metrics with the official rules: top-k accuracy, DAVIS J&F, Ego4D STA Top-5 mAP."""
