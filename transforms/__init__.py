"""Beam transforms of the feature stage and the Beam-free math they run."""
