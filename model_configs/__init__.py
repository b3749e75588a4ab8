"""Shipped model presets (JSON files beside this module)."""
