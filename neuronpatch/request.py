"""The edit request: which fact to change, and to what."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidRequestError


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit: ``prompt`` (containing ``subject``) should continue with ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequestError(
                    f"edit request field {name!r} must be a non-empty string, got {value!r}"
                )
        if self.subject not in self.prompt:
            raise InvalidRequestError(
                f"subject {self.subject!r} does not occur in prompt {self.prompt!r}; "
                "the subject must appear verbatim (same case) in the prompt"
            )
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise InvalidRequestError(
                f"edit request field 'target_true' must be a string or None, got {self.target_true!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The request as a plain dict (target_true omitted when unknown)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def coerce(cls, request: EditRequest | Mapping[str, Any]) -> EditRequest:
        """Accept an EditRequest or a dict with prompt/subject/target_new[/target_true]."""
        if isinstance(request, EditRequest):
            return request
        if not isinstance(request, Mapping):
            raise InvalidRequestError(
                f"an edit request must be a dict or EditRequest, got {type(request).__name__}"
            )
        missing = [k for k in ("prompt", "subject", "target_new") if k not in request]
        if missing:
            raise InvalidRequestError(
                f"edit request {dict(request)!r} is missing {', '.join(missing)}; "
                "give prompt, subject and target_new (target_true optional)"
            )
        unknown = set(request) - {"prompt", "subject", "target_new", "target_true"}
        if unknown:
            raise InvalidRequestError(
                f"edit request has unknown field(s) {sorted(unknown)}; "
                "expected prompt, subject, target_new, target_true"
            )
        return cls(**request)
