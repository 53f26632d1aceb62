"""Tools as outside code writes them: parameter kinds and types, docstrings, what they return
and how they fail."""

from __future__ import annotations

import dataclasses
import enum
from typing import Annotated, Literal

import numpy as np
import pydantic
import pytest
from PIL import Image

from sorai.apps.agent import Toolbox, ToolFailure, tool
from sorai.apps.agent.tools import MAX_OBSERVATION
from sorai.errors import SoraiError


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(pydantic.BaseModel):
    x: int
    y: int


@dataclasses.dataclass
class Size:
    width: int
    height: int


def test_parameters_arrive_as_their_declared_types():
    seen = {}

    def place(
        where: Point, size: Size, colour: Colour, shape: Literal["box", "dot"] = "box",
        *, label: str | None = None,
    ) -> str:  # fmt: skip
        """Place a shape."""
        seen.update(where=where, size=size, colour=colour, shape=shape, label=label)
        return "ok"

    t = tool(place)
    result = t({"where": {"x": 1, "y": 2}, "size": {"width": 3, "height": 4}, "colour": "red"})
    assert result.ok, result.output
    # Not dicts (what model_dump() made of them): the types the signature asked for.
    assert seen == {
        "where": Point(x=1, y=2), "size": Size(3, 4), "colour": Colour.RED, "shape": "box",
        "label": None,
    }  # fmt: skip
    props = t.parameters["properties"]
    assert props["shape"]["enum"] == ["box", "dot"] and "label" not in t.parameters["required"]


def test_positional_only_parameters_are_passed_by_position():
    def minus(a: int, b: int, /) -> int:
        """a - b."""
        return a - b

    assert tool(minus)({"a": 5, "b": 2}).output == "3"


def test_descriptions_come_from_google_and_rest_docstrings():
    def scale(factor: float, image: Annotated[str, pydantic.Field(description="explicit")]) -> str:
        """Scale an image.

        Longer explanation.

        Args:
            factor (float): how much bigger,
                as a ratio.
            image: loses to the explicit Field description.

        Returns:
            the new file.
        """
        return image

    def shift(dx: int) -> int:
        """Shift something.

        :param int dx: pixels to the right
        """
        return dx

    t = tool(scale)
    assert t.description == "Scale an image."
    props = t.parameters["properties"]
    assert props["factor"]["description"] == "how much bigger, as a ratio."
    assert props["image"]["description"] == "explicit"
    assert tool(shift).parameters["properties"]["dx"]["description"] == "pixels to the right"


def test_returns_json_cannot_write_are_still_observations():
    def give(value):
        def produce() -> object:
            """Return something."""
            return value

        return tool(produce)().output

    assert give(b"\x00\x01\x02") == "<3 bytes>"
    assert give(np.arange(3)) == "[0, 1, 2]"
    assert give(np.float32(1.5)) == "1.5"
    assert give(Image.new("RGB", (3, 4))) == '"<image 3x4 RGB>"'
    assert give(Size(1, 2)) == '{"width": 1, "height": 2}'
    assert give(Point(x=1, y=2)) == '{"x": 1, "y": 2}'
    assert give({3, 1}) == "[1, 3]"


@pytest.mark.parametrize("error", [ValueError, ToolFailure])
def test_a_huge_error_message_is_cut_like_any_observation(error):
    def fail() -> str:
        """Fails loudly."""
        raise error("x" * 100_000)

    result = tool(fail)()
    assert not result.ok and len(result.output) < MAX_OBSERVATION + 100
    assert result.output.endswith("more characters cut]")


def test_names_an_api_would_reject_are_refused_up_front():
    with pytest.raises(SoraiError, match="letters, digits"):
        tool(lambda: 1)  # "<lambda>"
    with pytest.raises(SoraiError, match="letters, digits"):
        tool(lambda: 1, name="a" * 65)
    assert tool(lambda: 1, name="get-weather_2").name == "get-weather_2"


def test_two_tools_with_one_name_are_refused():
    def dup() -> int:
        """One."""
        return 1

    with pytest.raises(SoraiError, match="two tools are named 'dup'"):
        Toolbox([dup, tool(dup)])
