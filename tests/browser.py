"""Open a page in headless Chromium (Debian's `chromium`, installed by scripts/test) and read the DOM it built."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest


@dataclass
class RenderedPage:
    body: dict[str, str]  # the <body> element's attributes after load (data-* set by the page's script)
    sections: dict[str, str] = field(default_factory=dict)  # <section id=…> → its visible text
    images: list[str] = field(default_factory=list)  # every <img>'s alt text
    title: str = ""


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = RenderedPage(body={})
        self._hidden = 0
        self._section: str | None = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.page.body = attrs
        elif tag == "title":
            self._in_title = True
        elif tag in ("script", "style"):
            self._hidden += 1
        elif tag == "section" and "id" in attrs:
            self._section = attrs["id"]
            self.page.sections[self._section] = ""
        elif tag == "img":
            self.page.images.append(attrs.get("alt", ""))

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._hidden -= 1
        elif tag == "title":
            self._in_title = False
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._in_title:
            self.page.title += data
        if self._section and not self._hidden:
            self.page.sections[self._section] += " " + " ".join(data.split())


def render_in_chromium(path: Path, tmp_path: Path) -> RenderedPage:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.fail("headless Chromium is needed for this test: install Debian's `chromium` (scripts/test does)")
    result = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
         Path(path).resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0 and "<body" in result.stdout, result.stderr[-3000:]
    reader = _Reader()
    reader.feed(result.stdout)
    page = reader.page
    page.sections = {name: " ".join(text.split()) for name, text in page.sections.items()}
    return page
