"""The op layer: the compiled library's loader, the pure-torch reference, one wrapper per op.

Everything above this package (``recallprune.optim``, ``recallprune.metrics``) calls the
wrappers here and never ``torch.ops.recallprune`` itself:

- :mod:`.extension` loads ``recallprune._C`` once, says per device whether its kernels are
  there (:func:`has_ops`, :func:`load_error`) and makes the one choice between kernel and
  reference (:func:`resolve_backend`);
- :mod:`.reference` holds the math in pure torch: the fallback and the test oracle;
- :mod:`.undecayed_sgd` and :mod:`.confusion` wrap their ops: backend choice, marshalling of
  the arguments, fake kernels.
"""

from .confusion import confusion_matrix, confusion_update_, confusion_update_stacked_
from .extension import (
    BACKENDS,
    check_backend,
    has_ops,
    kernel_image_problem,
    load_error,
    require_ops,
    resolve_backend,
)
from .reference import (
    confusion_update_reference,
    confusion_update_stacked_reference,
    undecayed_sgd_reference,
)
from .undecayed_sgd import undecayed_sgd_

__all__ = [
    "BACKENDS",
    "check_backend",
    "confusion_matrix",
    "confusion_update_",
    "confusion_update_reference",
    "confusion_update_stacked_",
    "confusion_update_stacked_reference",
    "has_ops",
    "kernel_image_problem",
    "load_error",
    "require_ops",
    "resolve_backend",
    "undecayed_sgd_",
    "undecayed_sgd_reference",
]
