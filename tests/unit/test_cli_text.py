"""What the CLI prints of values that came from the network."""

from __future__ import annotations

import io
from typing import cast

import pytest
from rich.console import Console, RenderableType

from modelpeer.client import view
from modelpeer.client.view import shown


@pytest.mark.parametrize(("value", "printed"), [
    ("acme/tiny-tts", "acme/tiny-tts"),
    ("naïve file ü.txt", "naïve file ü.txt"),
    ("evil\x1b[2J\x1b[31mname", "evil\\x1b[2J\\x1b[31mname"),
    ("progress\rfaked", "progress\\rfaked"),
    ("two\nlines\tand a bell\x07", "two\\nlines\\tand a bell\\x07"),
    ("right-to-left \u202eoverride", "right-to-left \\u202eoverride"),
    ("c1 \x9b31m", "c1 \\x9b31m"),
    (42, "42"),
])
def test_shown_escapes_control_characters(value: object, printed: str) -> None:
    assert shown(value) == printed


NETWORK_NAME = "[red]weights[/red] :smile: \x1b[31mname\r.bin"
LITERAL = "[red]weights[/red] :smile: \\x1b[31mname\\r.bin"


def rendered(renderable: RenderableType) -> str:
    """What a terminal that reads rich markup, emoji codes and highlights receives."""
    terminal = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=200)
    terminal.print(renderable)
    return cast(io.StringIO, terminal.file).getvalue()


def test_a_table_shows_network_names_literally() -> None:
    text = rendered(view.table(["FILE", view.right("SIZE")], [[shown(NETWORK_NAME), "1 B"]]))
    assert LITERAL in text and "\x1b" not in text and "\r" not in text


def test_a_progress_row_shows_network_names_literally() -> None:
    progress = view.transfer_progress(view.console())
    progress.add_task(shown(NETWORK_NAME), total=10, state=shown(NETWORK_NAME))
    text = rendered(progress.get_renderable())
    assert text.count(LITERAL) == 2 and "\x1b" not in text and "\r" not in text


def test_the_console_prints_strings_literally(capsys: pytest.CaptureFixture[str]) -> None:
    view.console().print(f"file {shown(NETWORK_NAME)}")
    assert capsys.readouterr().out == f"file {LITERAL}\n"
