"""A self-contained HTML page of plotly figures and tables (works offline).

plotly.js is embedded inline once, in the page head, so the file opens without a network
connection. Every figure increments `window.routesimDrawn` and the body's
`data-plots-drawn` attribute once Plotly has drawn it, and the head declares how many
figures the page holds (`<meta name="routesim-figures">`): a headless browser can check
that every figure drew.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from sim.record import write_text

_DRAWN_JS = (
    "window.routesimDrawn = (window.routesimDrawn || 0) + 1;"
    "document.body.setAttribute('data-plots-drawn', String(window.routesimDrawn));"
)

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em auto;
       max-width: 1250px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-top: 1.5em; }
p.note { color: #555; font-size: 0.92em; max-width: 60em; }
table.data { border-collapse: collapse; font-size: 0.88em; margin: 0.8em 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 7px; text-align: right;
                               white-space: nowrap; }
table.data td:last-child { white-space: normal; }
div.scroll { overflow-x: auto; }
table.data th { background: #f3f3f3; }
table.data td:first-child, table.data th:first-child { text-align: left; }
td.stable { background: #e5f5e0; } td.backlogged { background: #fee6ce; }
td.overloaded { background: #fcbba1; } td.ok { background: #e5f5e0; }
td.fail { background: #fcbba1; } tr.chosen td { font-weight: bold; }
.figure { margin: 0.5em 0 1.5em 0; }
nav a { margin-right: 1em; }
"""


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """The plotly.js bundle shipped with the plotly package (no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


class Page:
    """Builds one HTML document: headings, notes, figures and tables, in order."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.n_figures = 0

    def heading(self, text: str, level: int = 2, anchor: str | None = None) -> None:
        ident = f' id="{esc(anchor)}"' if anchor else ""
        self.parts.append(f"<h{level}{ident}>{esc(text)}</h{level}>")

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{esc(text)}</p>')

    def raw(self, markup: str) -> None:
        """Trusted markup built by this package (callers escape what they interpolate)."""
        self.parts.append(markup)

    def figure(self, fig: go.Figure) -> None:
        self.n_figures += 1
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig{self.n_figures}",
            post_script=_DRAWN_JS,
            config={"displaylogo": False, "responsive": True},
        )
        self.parts.append(f'<div class="figure">{div}</div>')

    def table(
        self,
        headers: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        cell_classes: Sequence[Sequence[str]] | None = None,
        row_classes: Sequence[str] | None = None,
    ) -> None:
        head = "".join(f"<th>{esc(h)}</th>" for h in headers)
        body = []
        for i, row in enumerate(rows):
            cls = cell_classes[i] if cell_classes else [""] * len(row)
            cells = "".join(
                f'<td class="{esc(c)}">{esc(v)}</td>' if c else f"<td>{esc(v)}</td>"
                for v, c in zip(row, cls, strict=False)
            )
            rc = f' class="{esc(row_classes[i])}"' if row_classes and row_classes[i] else ""
            body.append(f"<tr{rc}>{cells}</tr>")
        self.parts.append(
            f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>'
            f'{"".join(body)}</tbody></table></div>'
        )

    def render(self) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(self.title)}</title>"
            f'<meta name="routesim-figures" content="{self.n_figures}">'
            f"<style>{_CSS}</style>"
            f'<script type="text/javascript">{plotly_js()}</script>'
            '</head><body data-plots-drawn="0">'
            f"<h1>{esc(self.title)}</h1>" + "\n".join(self.parts) + "</body></html>\n"
        )

    def write(self, path: Path) -> Path:
        write_text(self.render(), path)
        return path
