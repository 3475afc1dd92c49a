"""The training application behind ``peftkit train`` / ``eval``: run configs (YAML), data, base-model
loading, the training loop (DDP / FSDP2, checkpoints, resume) and metrics. Built on the library
(``peftkit.core`` and the registered methods); the library never imports it."""
