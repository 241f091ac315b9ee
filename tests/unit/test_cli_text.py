"""What the CLI prints of values that came from the network."""

from __future__ import annotations

import pytest

from modelpeer.client.cli import shown


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
