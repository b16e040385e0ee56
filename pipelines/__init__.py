"""Reverie: pipelines."""
