"""The rule that picks which HF PEFT tests are about methods peftkit has.

A test is a *candidate* when
  1. its file is in ``FILES`` (files about a method peftkit has, or generic PeftModel / config /
     save-load / targeting machinery), and
  2. its node id does not name a method peftkit lacks: no ``<Name>Config`` of HF PEFT outside
     ``SUPPORTED_CONFIGS`` / ``NEUTRAL_CONFIGS``, no test class in ``EXCLUDED_CLASSES`` and no
     word sequence in ``FOREIGN_PHRASES``.
The *selection* is the candidates that pass with the reference ``peft`` (run (a)); run.py computes it.

The rule only reads node ids, so it is the same whichever ``peft`` is imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# file -> why it is in the rule. Everything else in HF PEFT's tests/ is out: other methods
# (LoHa, LoKr, OFT, BOFT, VeRA, X-LoRA, mixed models, trainable tokens, ...), LoRA add-ons that
# are methods of their own (LoRA-GA, LoRA-FA, LoRA+, Arrow, BD-LoRA, VeLoRA, ...), GPU /
# quantisation backends, and peft-internal utilities (BufferDict, IncrementalPCA).
FILES: dict[str, str] = {
    "test_custom_models.py": "common tester on small custom models (all methods, filtered per test)",
    "test_config.py": "config classes: save/load, copy, pickle, validation",
    "test_initialization.py": "init schemes (LoRA incl. PiSSA/OLoRA/rsLoRA/DoRA), hotswap, loading",
    "test_tuners_utils.py": "targeting, rank/alpha patterns, model/layer status",
    "test_other.py": "modules_to_save, kbit preparation, misc generic",
    "test_low_level_api.py": "state-dict level load/save, injection",
    "test_lora_variants.py": "LoRA variants (DoRA kept; aLoRA/KaSA excluded below)",
    "test_target_parameters.py": "LoRA on nn.Parameter (a LoRA feature)",
    "test_mapping.py": "get_peft_model",
    "test_helpers.py": "rescale_adapter_scale, check_if_peft_model, dtype casting",
    "test_hub_features.py": "model cards, local loading",
    "test_auto.py": "AutoPeftModel* loading",
    "test_integrations.py": "transformers integration",
    "test_adaption_prompt.py": "adaption prompt (LLaMA-Adapter)",
    "test_multitask_prompt_tuning.py": "multitask prompt tuning",
    "test_decoder_models.py": "common tester on causal LMs",
    "test_encoder_decoder_models.py": "common tester on seq2seq LMs",
    "test_feature_extraction_models.py": "common tester on encoders",
    "test_seq_classifier.py": "common tester on sequence classification",
    "test_token_classification_qa.py": "common tester on token classification / QA",
    "test_stablediffusion.py": "LoRA on diffusers models",
}

# HF PEFT config classes of the methods peftkit has.
SUPPORTED_CONFIGS: frozenset[str] = frozenset(
    {
        "LoraConfig",
        "AdaLoraConfig",
        "IA3Config",
        "PromptTuningConfig",
        "PromptEncoderConfig",
        "PrefixTuningConfig",
        "AdaptionPromptConfig",
        "MultitaskPromptTuningConfig",
    }
)
# Config classes that are not a method of their own: base classes and LoRA runtime options.
NEUTRAL_CONFIGS: frozenset[str] = frozenset({"PeftConfig", "PromptLearningConfig", "LoraRuntimeConfig"})

# Test classes whose subject is a method (or method-specific helper) peftkit lacks.
EXCLUDED_CLASSES: frozenset[str] = frozenset(
    {
        # test_initialization.py
        "TestAdamssInitialization",
        "TestBeftInitialization",
        "TestC3AInitialization",
        "TestCordaInitialization",
        "TestDeLoRAInitialization",
        "TestEvaInitialization",
        "TestFrodInitialization",
        "TestGraLoRAInitialization",
        "TestHiraInitialization",
        "TestHraInitialization",
        "TestKasaInitialization",
        "TestLilyInitialization",
        "TestLokrInitialization",
        "TestMissInitialization",
        "TestPeanutInitialization",
        "TestPsoftInitialization",
        "TestRoadInitialization",
        "TestShadowInitialization",
        "TestSupertuningInitialization",
        "TestTinyLoraInitialization",
        "TestVBLoraInitialization",
        "TestVeloraInitialization",
        "TestVeraInitialization",
        "TestWaveFTInitialization",
        # test_lora_variants.py
        "TestActivatedLora",
        "TestKasaRegularization",
        # test_helpers.py
        "TestKappaTuneSelector",
        "TestMontecloraTrainerMixin",
    }
)

# Lower-case word sequences (node ids are split at every non-alphanumeric character, so
# ``test_vera_model`` -> "test vera model", ``LoRA with KaSA`` -> "lora with kasa").
FOREIGN_PHRASES: tuple[str, ...] = (
    # other PEFT methods
    "loha", "lokr", "oft", "boft", "vera", "pvera", "vblora", "fourierft", "hra", "bone", "miss",
    "c3a", "shira", "randlora", "road", "waveft", "delora", "osf", "lily", "hira", "gralora",
    "glora", "psoft", "supertuning", "deft", "beft", "frod", "peanut", "unilora", "tinylora",
    "adamss", "cpt", "poly", "xlora", "shadow", "cartridge", "ln tuning", "lntuning",
    "trainable tokens", "trainable token", "peftmixedmodel", "mixed model",
    # LoRA add-ons that are methods of their own
    "arrow", "eva", "corda", "loftq", "loraga", "lora ga", "lorafa", "lora fa", "loraplus",
    "velora", "kasa", "monteclora", "mica", "bd lora", "bdlora", "alora", "activated lora",
    "intruders", "megatron", "kappatune", "kappa",
)  # fmt: skip

_WORDS = re.compile(r"[A-Za-z0-9]+")


def words(nodeid: str) -> str:
    """``" " + lower-case words + " "`` of a node id, for whole-word phrase matching."""
    return " " + " ".join(w.lower() for w in _WORDS.findall(nodeid)) + " "


@dataclass(frozen=True)
class Rule:
    """The selection rule; ``foreign_configs`` comes from the reference peft (see run.py)."""

    foreign_configs: frozenset[str]
    files: frozenset[str] = field(default_factory=lambda: frozenset(FILES))

    def exclusion(self, nodeid: str) -> str | None:
        """Why ``nodeid`` is not a candidate, or None when it is one."""
        path, _, rest = nodeid.partition("::")
        filename = path.rsplit("/", 1)[-1]
        if filename not in self.files:
            return f"file {filename} not in the rule"
        parts = rest.split("::")
        excluded_class = next((p for p in parts[:-1] if p in EXCLUDED_CLASSES), None)
        if excluded_class:
            return f"class {excluded_class}"
        names = set(_WORDS.findall(rest))
        config = sorted(names & self.foreign_configs)
        if config:
            return f"config {config[0]}"
        text = words(rest)
        phrase = next((p for p in FOREIGN_PHRASES if f" {p} " in text), None)
        if phrase:
            return f"method '{phrase}'"
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "files": sorted(self.files),
            "supported_configs": sorted(SUPPORTED_CONFIGS),
            "neutral_configs": sorted(NEUTRAL_CONFIGS),
            "foreign_configs": sorted(self.foreign_configs),
            "excluded_classes": sorted(EXCLUDED_CLASSES),
            "foreign_phrases": list(FOREIGN_PHRASES),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Rule:
        files = data["files"]
        foreign = data["foreign_configs"]
        assert isinstance(files, list) and isinstance(foreign, list)
        return cls(foreign_configs=frozenset(foreign), files=frozenset(files))


def foreign_configs(all_names: Iterable[str]) -> frozenset[str]:
    """The ``*Config`` names of a peft ``__all__`` that belong to methods peftkit lacks."""
    configs = {n for n in all_names if n.endswith("Config")}
    return frozenset(configs - SUPPORTED_CONFIGS - NEUTRAL_CONFIGS)
