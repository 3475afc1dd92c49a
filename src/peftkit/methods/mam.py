"""MAM Adapter ("Mix-And-Match"): prefix tuning on the attention + a scaled parallel adapter on the FFN.

He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022
(arXiv:2110.04366), §4.6. Their unified view writes every method as a change ``Δh`` added to a
sub-layer's output; the best mix they found spends a small budget on the attention (prefix tuning, which
they show is a gated parallel adapter on the attention) and a large one on the feed-forward block (a
*parallel* adapter with a scaled output)::

    attention:  head = softmax(Q [P_K; K]ᵀ / √d) [P_V; V]              P_K, P_V: 30 trained prefix vectors
    FFN:        y = FFN(x) + s · W_up ReLU(W_down x)                    bottleneck 512, s = 4

    x ─► attention (with prefix) ─► + ─┬─► FFN ───────────────────(+)─► + ─►
                                       └─► s·W_up ReLU(W_down ·) ──┘

A MAM adapter is a :class:`~peftkit.methods.combined.CombinedConfig` with the paper's two components; each
is placed by its own method file (``prefix_tuning.py``, ``bottleneck.py``). Defaults (paper, §4.6 and its
code): ``prefix``: 30 virtual tokens through the reparameterisation MLP of hidden width 800;
``adapter``: parallel, bottleneck 512, scaling 4, ReLU, up-projection zero at init (the "LoRA init" of the
paper's code). Override a part with ``MAMConfig().with_component("adapter", BottleneckConfig(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.registry import register_method
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.combined import CombinedConfig, CombinedModel, ComponentsArg
from peftkit.methods.prefix_tuning import PrefixTuningConfig


def mam_components() -> dict[str, PeftConfig]:
    """The paper's MAM adapter: ``prefix`` (l = 30, MLP 800) and a scaled parallel ``adapter`` (512, s = 4)."""
    return {
        "prefix": PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=800),
        "adapter": BottleneckConfig(style="parallel", bottleneck_size=512, scaling=4.0, non_linearity="relu"),
    }


@dataclass
class MAMConfig(CombinedConfig):
    """MAM adapter: the paper's components by default (see the module docstring).

    Raises:
        ValueError: the components are not one prefix tuning config and one bottleneck adapter config.
    """

    components: ComponentsArg = field(default_factory=mam_components)

    def __post_init__(self) -> None:
        self.peft_type = PeftType.MAM
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        kinds = sorted(type(c).__name__ for c in self.components.values())  # type: ignore[union-attr]
        if kinds != ["BottleneckConfig", "PrefixTuningConfig"]:
            raise ValueError(
                f"A MAM adapter is one PrefixTuningConfig and one BottleneckConfig, got {kinds}; for other "
                f"mixes use CombinedConfig(components={{...}})."
            )


register_method("MAM", MAMConfig, CombinedModel)
