"""Harmonic: sync daemon for school servers (content down, data up, online or by USB stick)."""

__version__ = "0.1.0"
