"""Shared plumbing of the pipeline: each module does one job, and the stage scripts at the
top level (01-05) and sae.py import from here. Nothing here is a stage of its own."""
