"""The console's files ship in the package: the vendored libraries are the files VENDORED.md
lists (by hash), with their licences, and pyproject's package data takes every static file."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "sorai" / "console" / "static"


def test_the_vendored_files_are_the_ones_listed_with_their_licences():
    listed = re.findall(
        r"\| ([\w.-]+\.(?:js|css)) \| ([0-9a-f]{64}) \| ([^|]+)\|",
        (STATIC / "vendor" / "VENDORED.md").read_text(),
    )
    assert listed
    for name, digest, licence in listed:
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest, name
        for file in re.findall(r"LICENSE-[\w]+\.txt", licence):
            assert (STATIC / "vendor" / file).is_file(), file
    vendored = {p.name for p in (STATIC / "vendor").iterdir() if p.suffix in (".js", ".css")}
    assert vendored == {name for name, _, _ in listed}


def test_package_data_takes_every_static_file():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["sorai.console"]
    package = STATIC.parent
    files = [p.relative_to(package).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, missing


def test_the_page_loads_nothing_from_another_origin():
    for path in STATIC.rglob("*"):
        if path.suffix in (".html", ".js", ".css") and path.parent.name != "vendor":
            text = path.read_text()
            assert not re.search(r"""(src|href)=["']https?://|import .* from ["']https?:""", text)
            assert "cdn" not in text.lower(), path
