"""Image metrics moved to :mod:`citygen.metrics` (the renderer's tile views score with them too);
this name stays importable for scripts and tests written against ``citygen.train.metrics``."""

from ..metrics import confusion_matrix, psnr, semantic_scores, ssim  # noqa: F401
