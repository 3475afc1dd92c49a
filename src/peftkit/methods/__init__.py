"""Built-in methods. Importing a method module registers it; add new methods to this list."""

from peftkit.methods import bitfit, freeze, ia3, lora  # noqa: F401
