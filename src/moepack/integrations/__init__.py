"""Serving-engine adapters, each behind its own extra (`moepack[vllm]`, ...).

Nothing here is imported by `moepack` itself: an adapter imports its engine, and the engine
imports the adapter through its own plugin mechanism.
"""
