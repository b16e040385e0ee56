"""Subcommands of `reverie`, one module each."""
