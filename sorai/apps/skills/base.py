"""What the skills share."""

from __future__ import annotations

from sorai.errors import SoraiError


class SkillError(SoraiError):
    """A skill called with arguments it cannot work with, or an answer it cannot read."""
