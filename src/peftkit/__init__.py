"""peftkit: parameter-efficient fine-tuning, a drop-in for Hugging Face PEFT.

from peftkit import LoraConfig, get_peft_model
model = get_peft_model(base_model, LoraConfig(r=8, target_modules="all-linear"))
"""

from peftkit.core.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from peftkit.core.checkpoint import get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.core.config import PeftConfig, PeftType, TaskType
from peftkit.core.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.core.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_base_model_state_dict,
    get_peft_model,
    inject_adapter_in_model,
    set_base_model_state_dict,
)
from peftkit.core.quantization import prepare_model_for_int8_training, prepare_model_for_kbit_training
from peftkit.core.registry import register_method, registered_methods
from peftkit.core.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from peftkit.core.tuner import BaseTuner
from peftkit.methods.adalora import AdaLoraConfig, AdaLoraModel
from peftkit.methods.adaption_prompt import AdaptionPromptConfig
from peftkit.methods.bitfit import BitFitConfig, BitFitModel
from peftkit.methods.bottleneck import BottleneckConfig, BottleneckModel, Parallel
from peftkit.methods.combined import CombinedConfig, CombinedModel
from peftkit.methods.freeze import FreezeConfig, FreezeModel, HeadOnlyConfig
from peftkit.methods.full import FullConfig, FullModel
from peftkit.methods.fusion import AdapterFusionConfig
from peftkit.methods.ia3 import IA3Config, IA3Model
from peftkit.methods.ln_tuning import LNTuningConfig, LNTuningModel
from peftkit.methods.lora import LoftQConfig, LoraConfig, LoraModel, replace_lora_weights_loftq
from peftkit.methods.mam import MAMConfig
from peftkit.methods.multitask_prompt_tuning import (
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
    MultitaskPromptTuningModel,
)
from peftkit.methods.p_tuning import (
    PromptEncoderConfig,
    PromptEncoderModel,
    PromptEncoderReparameterizationType,
)
from peftkit.methods.p_tuning_v2 import PTuningV2Config, PTuningV2Model
from peftkit.methods.prefix_tuning import PrefixTuningConfig, PrefixTuningModel
from peftkit.methods.prompt_tuning import PromptTuningConfig, PromptTuningInit, PromptTuningModel
from peftkit.methods.trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from peftkit.methods.unipelt import UniPELTConfig, UniPELTModel
from peftkit.placements.prompt import PromptLearningConfig

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdapterFusionConfig",
    "AdapterLayer",
    "AdaptionPromptConfig",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BaseTuner",
    "BitFitConfig",
    "BitFitModel",
    "BottleneckConfig",
    "BottleneckModel",
    "CombinedConfig",
    "CombinedModel",
    "FreezeConfig",
    "FreezeModel",
    "FullConfig",
    "FullModel",
    "HeadOnlyConfig",
    "IA3Config",
    "IA3Model",
    "LNTuningConfig",
    "LNTuningModel",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "MAMConfig",
    "ModulesToSaveWrapper",
    "MultitaskPromptTuningConfig",
    "MultitaskPromptTuningInit",
    "MultitaskPromptTuningModel",
    "PTuningV2Config",
    "PTuningV2Model",
    "Parallel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PrefixTuningModel",
    "PromptEncoderConfig",
    "PromptEncoderModel",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptTuningModel",
    "TaskType",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "TunerLayerStatus",
    "TunerModelStatus",
    "UniPELTConfig",
    "UniPELTModel",
    "__version__",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_int8_training",
    "prepare_model_for_kbit_training",
    "register_method",
    "registered_methods",
    "replace_lora_weights_loftq",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
