"""Reading regimen's report pages in tests: their tags, and their tables by the `data-*` attributes."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """A report page: every tag with its attributes; per table class, each run row's attributes and
    the `data-key`s of its value cells (the strategy diff)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: dict[str, list[dict[str, str]]] = {}
        self.keys: dict[str, dict[str, list[str]]] = {}
        self.table = ""
        self.run: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "table":
            self.table = a.get("class", "")
            self.rows.setdefault(self.table, [])
            self.keys.setdefault(self.table, {})
        elif tag == "tr" and "data-run" in a:
            self.run = a["data-run"]
            self.rows[self.table].append(a)
            self.keys[self.table][self.run] = []
        elif tag == "td" and self.run is not None and "value" in a.get("class", "").split():
            self.keys[self.table][self.run].append(a["data-key"])

    def all(self, tag: str) -> list[dict[str, str]]:
        """The attributes of every `tag` on the page."""
        return [a for t, a in self.tags if t == tag]
