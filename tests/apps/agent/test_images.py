"""The image tools, and the seed's chain: "make it grayscale and then watercolor"."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from sorai.apps.agent import Agent, images
from sorai.apps.agent.files import Workspace
from sorai.apps.agent.images import image_tools
from tests.apps.agent.scripted import Calls, ScriptedModel

NAME = re.compile(r"^image/([0-9a-f]{6})_(\w+?)_(\w+)\.png$")


@pytest.fixture(autouse=True)
def no_ocr(monkeypatch):
    """OCR off (the seam set to None) unless a test puts it back: the tools' cases run on
    blank pictures, where OCR only costs time; tests/vision covers it."""
    monkeypatch.setattr(images, "ocr", None)


@pytest.fixture
def space(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    image = Image.new("RGB", (80, 60), (220, 40, 40))
    image.paste((30, 60, 200), (40, 0, 80, 60))  # right half blue
    image.save(root / "photo.png")
    return Workspace(root)


@pytest.fixture
def tools(space):
    return {t.name: t for t in image_tools(space)}


def test_each_edit_writes_a_new_file_named_after_its_parent(tools, space):
    cases = {
        "grayscale": {},
        "blur": {"radius": 2},
        "watercolor": {},
        "rotate_image": {"degrees": 90},
        "resize_image": {"width": 40, "height": 30},
        "crop_image": {"left": 0, "top": 0, "right": 40, "bottom": 30},
        "mark_regions": {"regions": [[5, 5, 30, 30], [45, 10, 70, 50]]},
    }
    sizes = {"rotate_image": (60, 80), "resize_image": (40, 30), "crop_image": (40, 30)}
    for name, arguments in cases.items():
        result = tools[name]({"image": "photo.png", **arguments})
        assert result.ok, (name, result.output)
        match = NAME.match(result.output)
        assert match and match.group(3) == "photo", result.output
        with Image.open(space.root / result.output) as out:
            assert out.size == sizes.get(name, (80, 60)), name
            if name == "grayscale":
                assert out.mode == "L"
    assert (space.root / "photo.png").exists()  # the original is never changed


def test_watercolor_changes_the_picture(tools, space):
    with Image.open(space.root / "photo.png") as original:
        before = original.convert("RGB").tobytes()
    painted = tools["watercolor"]({"image": "photo.png"}).output
    with Image.open(space.root / painted) as out:
        assert out.convert("RGB").tobytes() != before


def test_describe_reports_size_mode_colours_and_no_ocr(tools):
    text = tools["describe_image"]({"image": "photo.png"}).output
    assert "80x60 pixels, mode RGB, format PNG" in text
    assert "#dc2828" in text and "#1e3cc8" in text  # the red and the blue halves
    assert "OCR not available" in text


def test_bad_image_input_is_a_clear_observation(tools, space):
    (space.root / "notes.txt").write_text("not an image")
    assert "not an image Pillow can read" in tools["grayscale"]({"image": "notes.txt"}).output
    assert "no file 'nope.png'" in tools["grayscale"]({"image": "nope.png"}).output
    assert "outside the workspace" in tools["blur"]({"image": "../x.png"}).output
    crop = tools["crop_image"](
        {"image": "photo.png", "left": 0, "top": 0, "right": 99, "bottom": 9}
    )
    assert not crop.ok and "within the 80x60 image" in crop.output


def test_the_seed_chain_grayscale_then_watercolor(space, tmp_path):
    """With ScriptedModel (a test double for the LLM): the 135M default model calls grayscale
    and then repeats that call instead of moving on, so the chain's moves are scripted; the
    tools, the files and the loop are real."""
    model = ScriptedModel(
        [
            Calls([("grayscale", {"image": "photo.png"})]),
            # Each next move names the file the last tool made (the last message's content).
            lambda messages: Calls([("watercolor", {"image": messages[-1]["content"]})]),
            lambda messages: Calls(
                [("final_answer", {"answer": f"The result is {messages[-1]['content']}."})]
            ),
        ]
    )
    agent = Agent(model, tools=["images"], workspace=space.root, trace_dir=tmp_path / "t")
    trace = agent.run("photo.png: make it grayscale and then watercolor")
    assert [s.tool for s in trace.tool_calls] == ["grayscale", "watercolor"]
    gray, painted = (s.observation for s in trace.tool_calls)
    gray_id = NAME.match(gray).group(1)
    assert NAME.match(gray).group(2, 3) == ("grayscale", "photo")
    assert NAME.match(painted).group(2, 3) == ("watercolor", gray_id)  # chained to its parent
    assert (space.root / gray).is_file() and (space.root / painted).is_file()
    assert sorted(p.name for p in (space.root / "image").iterdir()) == sorted(
        [gray.split("/")[1], painted.split("/")[1]]
    )
    assert painted in trace.answer


ARGUMENTS = {
    "describe_image": {},
    "crop_image": {"left": 0, "top": 0, "right": 10, "bottom": 8},
    "resize_image": {"width": 12, "height": 9},
    "rotate_image": {"degrees": 90},
    "grayscale": {},
    "blur": {"radius": 2},
    "watercolor": {},
    "mark_regions": {"regions": [[1, 1, 10, 10]]},
}


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("P", "png"), ("RGBA", "png"), ("LA", "png"), ("CMYK", "jpeg"), ("I;16", "png"),
     ("1", "png"), ("F", "tiff")],
)  # fmt: skip
@pytest.mark.parametrize("name", ARGUMENTS)
def test_every_tool_takes_every_mode(space, tools, mode, fmt, name):
    # CMYK cannot be written as PNG, blur refuses P and I;16: all failed before loading
    # normalised the mode.
    Image.new(mode, (20, 16)).save(space.root / f"pic.{fmt}")
    result = tools[name]({"image": f"pic.{fmt}", **ARGUMENTS[name]})
    assert result.ok, result.output
    if name != "describe_image":
        assert Image.open(space.root / result.output).mode in ("L", "LA", "RGB", "RGBA")


def test_sixteen_bit_grey_keeps_its_tones(space, tools):
    image = Image.new("I;16", (4, 1))
    image.putdata([0, 16384, 32768, 65535])
    image.save(space.root / "deep.png")
    out = Image.open(space.root / tools["grayscale"]({"image": "deep.png"}).output)
    assert [out.getpixel((x, 0)) for x in range(4)] == [0, 63, 127, 255]  # not clipped to white


def test_exif_orientation_is_applied(space, tools):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(space.root / "phone.jpg", exif=exif)
    assert (
        "20x40 pixels, mode RGB, format JPEG"
        in tools["describe_image"]({"image": "phone.jpg"}).output
    )
    out = tools["grayscale"]({"image": "phone.jpg"}).output
    assert Image.open(space.root / out).size == (20, 40)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Image.open warns
def test_corrupt_and_bomb_images_are_refused_clearly(space, tools):
    data = (space.root / "photo.png").read_bytes()
    (space.root / "cut.png").write_bytes(data[: len(data) // 2])
    result = tools["grayscale"]({"image": "cut.png"})
    assert not result.ok and "could not be decoded" in result.output
    # A tiny file declaring 10000x10000 pixels: refused before anything is decoded (Pillow
    # itself only warns at this size, and would decode 100 megapixels).
    Image.new("1", (10000, 10000)).save(space.root / "bomb.png")
    assert (space.root / "bomb.png").stat().st_size < 200_000
    result = tools["describe_image"]({"image": "bomb.png"})
    assert not result.ok and "10000x10000 pixels, more than the 64 megapixels" in result.output


@pytest.mark.parametrize(
    "box", [(10, 0, 5, 8), (0, 10, 8, 5), (0, 0, 81, 10), (0, 0, 10, 61), (5, 5, 5, 9)]
)
def test_crop_boxes_out_of_range_or_inverted_are_refused(tools, box):
    left, top, right, bottom = box
    arguments = {"image": "photo.png", "left": left, "top": top, "right": right, "bottom": bottom}
    result = tools["crop_image"](arguments)
    assert not result.ok and "within the 80x60 image" in result.output


def test_requests_offer_the_workspace_images_as_an_enum(space, tmp_path):
    # Under guided decoding the image argument can then only be a file that exists: without
    # it the default model named "image.png", which is not there.
    (space.root / "notes.txt").write_text("not an image")
    model = ScriptedModel(
        [
            Calls([("grayscale", {"image": "photo.png"})]),
            Calls([("final_answer", {"answer": "done"})]),
        ]
    )
    agent = Agent(model, tools=["grayscale"], workspace=space.root, trace_dir=tmp_path / "t")
    trace = agent.run("photo.png: make it grayscale")

    def offered(request):
        (grayscale,) = [t for t in request["tools"] if t["function"]["name"] == "grayscale"]
        return grayscale["function"]["parameters"]["properties"]["image"]["enum"]

    made = trace.tool_calls[0].observation
    assert offered(model.requests[0]) == ["photo.png"]
    assert offered(model.requests[1]) == ["photo.png", made]  # the new file, once it exists
    assert "enum" not in agent.toolbox.get("grayscale").parameters["properties"]["image"]


def test_the_image_enum_walk_is_bounded(space, monkeypatch):
    from sorai.apps.agent import images

    monkeypatch.setattr(images, "MAX_SCANNED", 10)
    deep = space.root / "deep"
    deep.mkdir()
    for i in range(20):
        (deep / f"f{i}.txt").write_text("")
    Image.new("RGB", (2, 2)).save(deep / "late.png")
    assert images._images_in(space) == ["photo.png"]  # the top level, then it stopped
    monkeypatch.setattr(images, "MAX_SCANNED", 100)
    assert images._images_in(space) == ["photo.png", "deep/late.png"]


def test_describe_reads_text_and_mark_regions_finds_regions(space, tools, monkeypatch):
    # The seam filled by default: sorai's OCR when the vision extra is installed.
    pytest.importorskip("rapidocr", reason="the vision extra (rapidocr) is not installed")
    from PIL import ImageDraw, ImageFont

    monkeypatch.setattr(images, "ocr", images._default_ocr())
    page = Image.new("RGB", (420, 160), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 28)
    draw.text((20, 20), "Total 42.00", font=font, fill="black")
    draw.ellipse((300, 60, 380, 140), fill=(0, 90, 200))  # an object with no text
    page.save(space.root / "note.png")
    assert "Total 42.00" in tools["describe_image"]({"image": "note.png"}).output
    result = tools["mark_regions"]({"image": "note.png"})
    assert result.ok, result.output
    marked, *table = result.output.splitlines()
    assert NAME.match(marked).group(2) == "marks"
    assert table[0].startswith("[1] 'Total 42.00' at ")
    assert table[1] == "[2] a region at [300, 60, 381, 141]"
