"""Corrections: what annotators changed in our predictions, kept as a dataset (capture), summarised (report) and
used to fine-tune the model (train)."""
