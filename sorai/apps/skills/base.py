"""What the skills share."""

from __future__ import annotations

from typing import Any

from sorai.errors import SoraiError


class SkillError(SoraiError):
    """A skill called with arguments it cannot work with, or an answer it cannot read."""


def checked(answer: Any, schema: dict[str, Any], what: str) -> Any:
    """`answer` when it validates against `schema`: an endpoint that ignores response_format
    may send other JSON, which is a clear error rather than a KeyError later."""
    import jsonschema

    error = next(iter(jsonschema.Draft202012Validator(schema).iter_errors(answer)), None)
    if error is not None:
        raise SkillError(
            f"the endpoint's {what} does not fit the schema asked for: {error.message}"
        )
    return answer
