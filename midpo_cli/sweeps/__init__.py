"""Sweeps at scale: per-job resources when jobs share a machine (resources.py) and the per-prior search (tune.py)."""
