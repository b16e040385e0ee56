"""Reverie: storage."""
