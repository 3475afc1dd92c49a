"""The method-agnostic library: configs, the method registry, module targeting, the adapter layer and
tuner base classes, checkpoints in HF PEFT's format, merging, hot-swapping, quantized bases and the
``PeftModel`` wrapper. Nothing here names a method, and nothing here imports ``peftkit.methods``,
``peftkit.train``, ``peftkit.bench`` or ``peftkit.cli``."""
