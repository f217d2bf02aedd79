"""The checkpoint format moved below the renderer, to :mod:`citygen.store.checkpoint`; this name
stays importable for scripts and tests written against ``citygen.train.checkpoint``."""

from ..store.checkpoint import (  # noqa: F401
    FORMAT,
    check_finite,
    checkpoint_paths,
    list_checkpoints,
    load_checkpoint,
    load_module_state,
    optimizer_tensors,
    read_sidecar,
    resolve_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
