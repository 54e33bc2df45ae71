"""Evaluation of trained runs and the comparison report."""
