"""Reverie: model."""
