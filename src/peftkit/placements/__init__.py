"""Placements shared by several methods: where an adapter enters the model (e.g. virtual tokens in front
of the input, or keys and values in front of each attention layer's). Methods build on them; the core
does not know them."""
