"""Built-in methods. Importing a method module registers it; add new methods to this list."""

from peftkit.methods import adalora, adaption_prompt, bitfit, bottleneck, freeze, fusion, ia3, lora  # noqa: F401
