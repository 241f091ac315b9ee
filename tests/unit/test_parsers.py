"""Property tests of the parsers of what clients and operators type: proxy routes, Range
headers, Hub names, settings. Each either returns a value that keeps its invariants or raises its
documented error, never another exception; where a value can be written back, it round-trips.
(Peer messages: test_peermsg.py.)"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from modelpeer.daemon import hubnames
from modelpeer.daemon.config import (
    _SIZE_UNITS,
    OPTIONS,
    Option,
    load_config,
    parse_bool,
    parse_duration,
    parse_hostport,
    parse_size,
)
from modelpeer.daemon.errors import BadRequest, ConfigError, InvalidName
from modelpeer.daemon.proxy import _Unsatisfiable, parse_range, parse_route

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
# what hostile paths are made of: dot segments, encoded separators, NUL, backslashes, unicode
PATH_BITS = st.sampled_from(["..", ".", "", "%2e%2e", "%2E.", "%2F", "%2f..", "%00", "\\",
                             "%5C", "a%0Ab", "résolve", "ﬁle", "\u202e", "resolve", "main",
                             "api", "models", "datasets", "tree", "revision", "acme",
                             "tiny-tts", "config.json", "refs%2Fpr%2F1", "/", "%"])
HOSTILE_PATHS = st.lists(st.one_of(PATH_BITS, TEXT), max_size=8).map("/".join)
SEGMENT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(
    lambda s: ".." not in s and s not in ("resolve", "revision", "tree", "paths-info"))
REPO_IDS = st.lists(SEGMENT, min_size=1, max_size=2).map("/".join)
REVISIONS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\r\n"),
                    min_size=1, max_size=40).filter(lambda r: ".." not in r)
PATH_SEGMENTS = st.text(st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="/\\\0"), min_size=1, max_size=20)
FILE_PATHS = st.lists(PATH_SEGMENTS.filter(lambda s: s not in (".", "..")), min_size=1,
                      max_size=4).map("/".join)


# --- routes ---------------------------------------------------------------------------------
def assert_route_is_safe(raw: str) -> None:
    try:
        route = parse_route(raw)
    except InvalidName:
        return
    if route is None:
        return
    assert hubnames.repo_id(route.repo.id.split("/")) == route.repo.id
    if route.revision is not None:
        assert hubnames.revision(route.revision) == route.revision
    if route.kind == "resolve":
        assert hubnames.file_path(route.path) == route.path


@settings(max_examples=100)
@given(HOSTILE_PATHS)
def test_a_route_is_valid_names_or_invalid_name(raw: str) -> None:
    assert_route_is_safe(raw)
    assert_route_is_safe("/" + raw)


@given(st.sampled_from(["", "datasets/", "spaces/"]), REPO_IDS, REVISIONS, FILE_PATHS)
def test_resolve_urls_round_trip(prefix: str, repo: str, revision: str, path: str) -> None:
    route = parse_route(f"/{prefix}{repo}/resolve/{quote(revision, safe='')}/{quote(path)}")
    assert route is not None
    assert (route.kind, route.repo.id, route.revision, route.path) == (
        "resolve", repo, revision, path)
    assert route.repo.type == {"": "model", "datasets/": "dataset", "spaces/": "space"}[prefix]


@given(REPO_IDS, st.sampled_from(["tree", "revision", "paths-info"]), REVISIONS, FILE_PATHS)
def test_api_urls_round_trip(repo: str, verb: str, revision: str, sub: str) -> None:
    assert parse_route(f"/api/models/{repo}") is not None
    route = parse_route(f"/api/datasets/{repo}/{verb}/{quote(revision, safe='')}/{quote(sub)}")
    assert route is not None
    assert (route.kind, route.repo.type, route.repo.id, route.revision, route.path) == (
        verb, "dataset", repo, revision, sub)


# --- Range ----------------------------------------------------------------------------------
SIZES = st.integers(0, 1 << 40)


@settings(max_examples=100)
@given(st.one_of(TEXT, st.from_regex(r"\s*bytes\s*=\s*\d*\s*-\s*\d*\s*", fullmatch=True)),
       SIZES)
def test_a_range_is_a_span_inside_the_file_or_a_documented_refusal(header: str,
                                                                   size: int) -> None:
    try:
        span = parse_range(header, size)
    except (BadRequest, _Unsatisfiable):
        return
    assert span is not None
    start, end = span
    assert 0 <= start < end <= size
    assert header.isascii(), "only ASCII digits make a Range (RFC 9110 DIGIT)"


@given(SIZES.filter(bool), st.data())
def test_ranges_round_trip(size: int, data: st.DataObject) -> None:
    a = data.draw(st.integers(0, size - 1))
    b = data.draw(st.integers(a, size - 1))
    n = data.draw(st.integers(1, size + 10))
    assert parse_range(f"bytes={a}-{b}", size) == (a, b + 1)
    assert parse_range(f"bytes={a}-", size) == (a, size)
    assert parse_range(f"bytes=-{n}", size) == (max(0, size - n), size)
    assert parse_range(None, size) is None
    with pytest.raises(_Unsatisfiable):
        parse_range(f"bytes={size}-", size)


# --- Hub names ------------------------------------------------------------------------------
@settings(max_examples=100)
@given(st.one_of(HOSTILE_PATHS, TEXT))
def test_names_are_accepted_unchanged_or_refused_as_invalid_names(value: str) -> None:
    checks = [lambda v: hubnames.repo_id(v.split("/")), hubnames.revision, hubnames.file_path,
              hubnames.quoted_file_path, hubnames.commit, hubnames.any_digest,
              lambda v: hubnames.digest(v, "sha256"), hubnames.repo_type]
    for check in checks:
        try:
            accepted = check(value)
        except InvalidName:
            continue
        assert check(accepted) == accepted
    try:
        path = hubnames.file_path(value)
    except InvalidName:
        return
    parts = path.split("/")
    assert not path.startswith("/") and "\\" not in path and "\0" not in path
    assert ".." not in parts and "." not in parts and "" not in parts


# --- settings -------------------------------------------------------------------------------
NUMBERS = st.integers(0, 10**30)


@settings(max_examples=100)
@given(st.one_of(TEXT, st.from_regex(r"\s*[0-9]{1,30}(\.[0-9]{1,5})?\s*[a-zA-Z]{0,3}\s*",
                                     fullmatch=True)))
@example("9" * 400 + ".5 TiB")  # past a float's range
def test_a_size_is_a_count_of_bytes_or_a_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError as e:
        assert "size" in str(e)
        return
    assert isinstance(size, int) and size >= 0


@given(NUMBERS, st.sampled_from(sorted(_SIZE_UNITS)), st.sampled_from(["", " "]))
def test_sizes_round_trip(n: int, unit: str, space: str) -> None:
    assert parse_size(f"{n}{space}{unit}") == n * _SIZE_UNITS[unit]
    assert parse_size(f"{n}{space}{unit.upper()}") == n * _SIZE_UNITS[unit]
    assert parse_size(n) == n


@settings(max_examples=100)
@given(st.one_of(TEXT, st.from_regex(r"\s*[0-9]{1,30}(\.[0-9]{1,5})?\s*(ms|s|m|h|d)?\s*",
                                     fullmatch=True),
                 st.floats(), st.integers()))
@example("9" * 400 + "d")  # past a float's range
def test_a_duration_is_finite_seconds_or_a_value_error(value: str | float) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        assert "duration" in str(e)
        return
    assert math.isfinite(seconds) and seconds >= 0


@given(st.integers(0, 10**9), st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60),
                                               ("h", 3600), ("d", 86400), ("", 1)]))
def test_durations_round_trip(n: int, unit: tuple[str, float]) -> None:
    assert parse_duration(f"{n}{unit[0]}") == pytest.approx(n * unit[1])
    assert parse_duration(n) == n


@given(TEXT)
def test_a_boolean_is_a_bool_or_a_value_error(text: str) -> None:
    try:
        value = parse_bool(text)
    except ValueError:
        return
    assert value is (text.strip().lower() in ("1", "true", "yes", "on"))


@given(st.sampled_from(["1", "true", "yes", "on", "0", "false", "no", "off"]),
       st.sampled_from([str.upper, str.lower, str.title]), st.sampled_from(["", " ", "\t"]))
def test_booleans_round_trip(word: str, case: Callable[[str], str], pad: str) -> None:
    assert parse_bool(f"{pad}{case(word)}{pad}") is (word in ("1", "true", "yes", "on"))
    assert parse_bool(parse_bool(word)) is parse_bool(word)


HOSTS = st.one_of(st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?", fullmatch=True),
                  st.ip_addresses().map(str))


@settings(max_examples=50)
@given(HOSTS, st.integers(0, 65535))
def test_host_and_port_round_trip(host: str, port: int) -> None:
    written = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert parse_hostport(written) == (host, port)


@settings(max_examples=100)
@given(st.one_of(TEXT, st.from_regex(r"\[?[^\]]{0,10}\]?:[0-9]{1,6}", fullmatch=True)))
def test_host_and_port_is_a_port_in_range_or_a_value_error(text: str) -> None:
    try:
        host, port = parse_hostport(text)
    except ValueError:
        return
    assert 0 <= port <= 65535 and "[" not in host and "]" not in host


ENV_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                   max_size=30)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(OPTIONS)), ENV_TEXT)
def test_any_setting_from_the_environment_is_a_config_or_a_config_error(
        option: Option, text: str) -> None:
    try:
        load_config([], environ={option.env: text})
    except ConfigError as e:
        assert str(e)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([o.name for o in OPTIONS]),
       st.one_of(TEXT, st.integers(), st.floats(), st.booleans()))
@example("max_transfers", float("inf"))  # int(inf) overflows
def test_any_value_in_the_config_file_is_a_config_or_a_config_error(
        tmp_path_factory: pytest.TempPathFactory, key: str, value: object) -> None:
    path = tmp_path_factory.mktemp("conf") / "modelpeer.toml"
    path.write_text(f"{key} = {toml_value(value)}\n")
    try:
        load_config(["--config", str(path)], environ={})
    except ConfigError as e:
        assert str(e)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(
            value) else repr(value)
    if isinstance(value, int):
        return str(value)
    return '"' + re.sub(r'[\\"\x00-\x1f\x7f]', lambda m: f"\\u{ord(m.group()):04x}",
                        str(value)) + '"'

