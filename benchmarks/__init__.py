"""Benchmarks of the feature stage against what a user would write instead."""
