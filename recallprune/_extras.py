"""The study's optional dependencies. The library needs only torch, numpy and scipy; the
study's packages come with the extra ``recallprune[study]``, and importing one that is
missing raises :class:`MissingExtra`, whose one-line message says what to install:

    with study_imports("dataset 'mnist1d'"):
        from mnist1d.data import make_dataset
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

STUDY_EXTRA = "recallprune[study]"

# Import name -> the distribution that provides it, for every package of the extra (keep in
# step with [project.optional-dependencies] study in pyproject.toml).
STUDY_PACKAGES = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "statsmodels": "statsmodels",
    "yaml": "pyyaml",
    "mnist1d": "mnist1d",
    "mlxtend": "mlxtend",
}


class MissingExtra(ModuleNotFoundError, RuntimeError):
    """An optional dependency of the study is not installed; the message says what to
    install. A ModuleNotFoundError, which is what it is, and a RuntimeError, which is what
    the command line reports in one line (and what the study raised for these before)."""


def missing_message(module: str | None, purpose: str = "the study") -> str | None:
    """The one-line message for a missing ``module`` (a dotted import name), or ``None``
    if it is none of the study's optional packages."""
    top = (module or "").partition(".")[0]
    if top == "torchvision":
        # Not in the extra: each torchvision release requires one torch release, so pip
        # would replace the torch already installed (and built for this machine).
        import torch

        return (
            f"{purpose} needs the torchvision package, which is not installed: install the "
            f"torchvision release built for your torch {torch.__version__} (from the same "
            "index as torch)"
        )
    package = STUDY_PACKAGES.get(top)
    if package is None:
        return None
    return (
        f"{purpose} needs the {package} package, which is not installed: "
        f"pip install '{STUDY_EXTRA}' (or pip install {package})"
    )


@contextlib.contextmanager
def study_imports(purpose: str = "the study") -> Iterator[None]:
    """Imports in this block that fail for a missing optional package raise
    :class:`MissingExtra` naming the extra; ``purpose`` says what needs it."""
    try:
        yield
    except MissingExtra:
        raise
    except ModuleNotFoundError as error:
        message = missing_message(error.name, purpose)
        if message is None:
            raise
        raise MissingExtra(message, name=error.name) from error
