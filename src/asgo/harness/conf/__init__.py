"""Hydra configuration groups of asgo-train (a package so that Hydra finds it when installed)."""
