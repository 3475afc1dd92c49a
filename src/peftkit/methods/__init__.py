"""Built-in methods. Importing a method module registers it; add new methods to this list.

``combined``, ``mam`` and ``unipelt`` combine the methods above them (several methods as one adapter).
"""

from peftkit.methods import (  # noqa: F401  # noqa: F401  (built from the methods above)
    adalora,
    adaption_prompt,
    bitfit,
    bottleneck,
    combined,
    freeze,
    full,
    fusion,
    ia3,
    ln_tuning,
    lora,
    mam,
    multitask_prompt_tuning,
    p_tuning,
    p_tuning_v2,
    prefix_tuning,
    prompt_tuning,
    trainable_tokens,
    unipelt,
)
