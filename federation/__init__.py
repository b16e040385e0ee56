"""Reverie: federation."""
