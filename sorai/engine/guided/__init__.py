"""Guided decoding: constraints compiled with llguidance (compile.py), schema transforms
(schema.py) and the token budget and loop guard that keep structured output whole (budget.py)."""
