"""peftkit: parameter-efficient fine-tuning, a drop-in for Hugging Face PEFT.

from peftkit import LoraConfig, get_peft_model
model = get_peft_model(base_model, LoraConfig(r=8, target_modules="all-linear"))
"""

from peftkit.checkpoint import get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.config import PeftConfig, PeftType, TaskType
from peftkit.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.methods.bitfit import BitFitConfig, BitFitModel
from peftkit.methods.freeze import FreezeConfig, FreezeModel, HeadOnlyConfig
from peftkit.methods.ia3 import IA3Config, IA3Model
from peftkit.methods.lora import LoraConfig, LoraModel
from peftkit.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from peftkit.registry import register_method, registered_methods
from peftkit.tuner import BaseTuner

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "BaseTuner",
    "BitFitConfig",
    "BitFitModel",
    "FreezeConfig",
    "FreezeModel",
    "HeadOnlyConfig",
    "IA3Config",
    "IA3Model",
    "LoraConfig",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "__version__",
    "get_peft_model",
    "get_peft_model_state_dict",
    "register_method",
    "registered_methods",
    "set_peft_model_state_dict",
]
