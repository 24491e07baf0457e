"""Conversion recipes, one JSON file per supported model alias."""
