"""Built-in methods. Importing a method module registers it; add new methods to this list.

``combined``, ``mam`` and ``unipelt`` combine the methods above them (several methods as one adapter).
"""

from peftkit.methods import (  # noqa: F401
    adalora,
    adaption_prompt,
    bitfit,
    bottleneck,
    combined,
    freeze,
    fusion,
    ia3,
    lora,
    mam,
    unipelt,
)
