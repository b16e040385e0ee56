"""Reverie: workers."""
