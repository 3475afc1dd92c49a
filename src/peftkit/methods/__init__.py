"""Built-in methods. Importing a method module registers it; add new methods to this list."""

from peftkit.methods import lora  # noqa: F401
