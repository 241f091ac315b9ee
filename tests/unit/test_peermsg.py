"""Peer messages are parsed strictly: every malformation is a BadMessage naming the field,
never another exception."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelpeer.daemon.errors import BadMessage
from modelpeer.daemon.peermsg import (
    MAX_MAPS,
    JobState,
    TransferSource,
    parse_chunk_map,
    parse_chunk_maps,
    parse_job_id,
    parse_job_status,
    parse_map_query,
    parse_repo_listing,
    parse_sealed_token,
    parse_status,
    parse_warm_spec,
)

D = "a" * 64
NODE = "0123456789abcdef" * 2
GOOD_FILE = {"path": "model.bin", "digest": D, "algo": "sha256", "size": 10, "lfs": True}
GOOD_TRANSFER = {"digest": D, "label": "acme/tts/model.bin", "size": 10, "transfer": "peer",
                 "available": 4, "rate": 2, "feeder": NODE, "received": 3,
                 "probing": False, "leaf": False, "since": 0.25}
GOOD_SPEC = {"id": "0123456789ab", "repo_type": "model", "repo_id": "acme/tts",
             "revision": "main", "commit": "c" * 40, "sealed_token": None, "files": [GOOD_FILE]}


def test_good_messages_parse() -> None:
    s = parse_status({"node_id": NODE, "name": "h1", "version": "0.1", "bt_port": 6582,
                      "chunks": 3})
    assert (s.node_id, s.bt_port, s.chunks, s.transfers) == (NODE, 6582, 3, ())
    t = parse_status({"node_id": NODE, "transfers": [GOOD_TRANSFER]}).transfers[0]
    assert (t.digest, t.label, t.size, t.state.source, t.state.feeder) == (
        D, "acme/tts/model.bin", 10, TransferSource.PEER, NODE)
    assert t.to_json() == GOOD_TRANSFER
    m = parse_chunk_map({"digest": D, "chunks": [{"index": 1, "info_hash": "b" * 40}],
                         "small": False, "transfer": "upstream", "available": 5, "rate": 7,
                         "received": 8, "upstream_rate": 9, "upstream_intake": 11,
                         "upstream_reads": 2}, D, 4)
    assert m.chunks[0].index == 1 and m.transfer is not None
    assert (m.transfer.source, m.transfer.available, m.transfer.rate, m.transfer.received) == (
        TransferSource.UPSTREAM, 5, 7, 8)
    # a node that does not say what it receives
    old = parse_chunk_map({"digest": D, "transfer": "upstream", "rate": 7}, D, 4).transfer
    assert old is not None and old.received == 0
    assert (m.upstream_rate, m.upstream_intake, m.upstream_reads) == (9, 11, 2)
    assert parse_chunk_map({"digest": D}, D, 4).upstream_reads == 0  # an older node
    for bad in (-1, "fast", 2**80, True):
        with pytest.raises(BadMessage):
            parse_chunk_map({"digest": D, "upstream_intake": bad}, D, 4)
        with pytest.raises(BadMessage):
            parse_chunk_map({"digest": D, "upstream_reads": bad}, D, 4)
    assert parse_chunk_map({"digest": D}, D, 4).transfer is None
    spec = parse_warm_spec(GOOD_SPEC)
    assert spec.files[0].path == "model.bin" and spec.to_json()["files"][0] == GOOD_FILE
    assert not spec.pin  # a coordinator that does not say pins nothing
    pinned = parse_warm_spec(spec_with(pin=True))
    assert pinned.pin and parse_warm_spec(pinned.to_json()) == pinned
    assert spec.members == ()  # a coordinator that does not say names no cohort
    crowd = parse_warm_spec(spec_with(members=[NODE, "f" * 32]))
    assert crowd.members == (NODE, "f" * 32) and parse_warm_spec(crowd.to_json()) == crowd
    j = parse_job_status({"state": "done", "error": "", "files": 1, "done_files": 1,
                          "bytes": 5, "have_bytes": 5, "repo": "acme/tts@c", "started": 1.5,
                          "finished": 2})
    assert j.state is JobState.DONE
    listing = parse_repo_listing({"commit": "c" * 40, "files": [GOOD_FILE]})
    assert listing.files == spec.files and parse_repo_listing(listing.to_json()) == listing
    assert parse_sealed_token({"sealed_token": "abc"}) == "abc"
    assert parse_job_id({"job": "0123456789ab"}) == "0123456789ab"
    with pytest.raises(BadMessage):
        parse_job_id({"job": "../x"})


def spec_with(**change: Any) -> dict[str, Any]:
    return {**GOOD_SPEC, **change}


def file_with(**change: Any) -> dict[str, Any]:
    return spec_with(files=[{**GOOD_FILE, **change}])


@pytest.mark.parametrize("message", [
    [], "x", None, spec_with(id="../../x"), spec_with(repo_type="weights"),
    spec_with(repo_id="../acme/tts"), spec_with(repo_id="a/b/c"), spec_with(commit="main"),
    spec_with(revision="a/../b"), spec_with(files={"x": 1}), spec_with(files=[[]]),
    file_with(path="../secrets"), file_with(path="/etc/passwd"), file_with(path="a//b"),
    file_with(path="a\\b"), file_with(path="a\x00b"), file_with(digest="A" * 64),
    file_with(digest="a" * 40), file_with(algo="md5"), file_with(size=-1), file_with(size=True),
    file_with(size="10"), file_with(size=1 << 60), file_with(lfs=False),
    spec_with(files=[GOOD_FILE, GOOD_FILE]), spec_with(sealed_token=5), spec_with(pin="yes"),
    spec_with(pin=1), spec_with(pin=None), spec_with(members=NODE), spec_with(members=[5]),
    spec_with(members=["../x"]), spec_with(members=[NODE, NODE]),
    spec_with(members=[f"{i:032x}" for i in range(5000)]),
])
def test_malformed_warm_jobs_are_refused(message: Any) -> None:
    with pytest.raises(BadMessage):
        parse_warm_spec(message)


@pytest.mark.parametrize("message", [
    {}, [], {"commit": "c" * 40}, {"commit": "c" * 40, "files": []},
    {"commit": "main", "files": [GOOD_FILE]}, {"files": [GOOD_FILE]},
    {"commit": "c" * 40, "files": [GOOD_FILE, GOOD_FILE]},
    {"commit": "c" * 40, "files": [{**GOOD_FILE, "path": "../x"}]},
])
def test_malformed_repo_listings_are_refused(message: Any) -> None:
    with pytest.raises(BadMessage):
        parse_repo_listing(message)


@pytest.mark.parametrize("message", [
    {}, [], {"node_id": NODE[:-1]}, {"node_id": NODE, "bt_port": 70000},
    {"node_id": NODE, "bt_port": "6582"}, {"node_id": NODE, "chunks": -1},
    {"node_id": NODE, "name": "x" * 1000}, {"node_id": 5},
    {"node_id": NODE, "transfers": {}}, {"node_id": NODE, "transfers": [[]]},
    {"node_id": NODE, "transfers": [GOOD_TRANSFER] * 65},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "digest": "../x"}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "transfer": ""}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "available": 11}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "feeder": "h1"}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "label": "x" * 2000}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "size": "10"}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "probing": 1}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "leaf": "yes"}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "since": -1}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "since": float("inf")}]},
    {"node_id": NODE, "transfers": [{**GOOD_TRANSFER, "since": "1"}]},
])
def test_malformed_status_is_refused(message: Any) -> None:
    with pytest.raises(BadMessage):
        parse_status(message)


@pytest.mark.parametrize("message", [
    {"digest": "b" * 64}, {"digest": D, "chunks": {"index": 1}},
    {"digest": D, "chunks": [[1]]}, {"digest": D, "chunks": [{"index": 4}]},
    {"digest": D, "chunks": [{"index": 0, "info_hash": "zz"}]},
    {"digest": D, "chunks": [{"index": 0}] * 5}, {"digest": D, "small": "yes"},
    {"digest": D, "transfer": "moon"}, {"digest": D, "transfer": "peer", "available": -1},
    {"digest": D, "transfer": "peer", "rate": "fast"},
])
def test_malformed_chunk_maps_are_refused(message: Any) -> None:
    with pytest.raises(BadMessage):
        parse_chunk_map(message, D, 4)


E = "e" * 64


def test_chunk_maps_of_several_blobs_come_by_digest() -> None:
    maps = parse_chunk_maps({"maps": [{"digest": E, "small": True},
                                      {"digest": D, "chunks": [{"index": 3}]}]}, {D: 4, E: 1})
    assert maps[D].chunks[0].index == 3 and maps[E].small and not maps[D].stood_in


@pytest.mark.parametrize("message", [
    {"maps": [{"digest": D}]},  # one missing
    {"maps": [{"digest": D}, {"digest": D}]},  # one twice
    {"maps": [{"digest": D}, {"digest": "b" * 64}]},  # one not asked for
    {"maps": [{"digest": D}, {"digest": E}, {"digest": E}]},
    {"maps": [{"digest": D}, {"digest": E, "chunks": [{"index": 1}]}]},  # E has one chunk
    {"maps": {D: {}, E: {}}}, {"maps": [D, E]}, [], {},
])
def test_malformed_answers_of_several_chunk_maps_are_refused(message: Any) -> None:
    with pytest.raises(BadMessage):
        parse_chunk_maps(message, {D: 4, E: 1})


@pytest.mark.parametrize("digests", [
    [], [D, D], [D, "../etc"], [D.upper()], ["a" * 63], [f"{i:064x}" for i in range(MAX_MAPS + 1)],
])
def test_a_bad_question_for_several_chunk_maps_is_refused(digests: list[str]) -> None:
    with pytest.raises(BadMessage):
        parse_map_query(digests)
    assert parse_map_query([D, E, "b" * 40]) == [D, E, "b" * 40]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=20)


@given(json_values)
def test_no_json_value_breaks_a_parser_otherwise(value: Any) -> None:
    for parse in (parse_status, parse_warm_spec, parse_job_status, parse_sealed_token, parse_job_id,
                  parse_repo_listing, lambda v: parse_chunk_map(v, D, 4),
                  lambda v: parse_chunk_maps(v, {D: 4, E: 2})):
        with contextlib.suppress(BadMessage):
            parse(value)


@given(st.dictionaries(st.sampled_from(list(GOOD_FILE)), json_values, max_size=5))
def test_no_file_entry_breaks_the_warm_parser_otherwise(entry: dict[str, Any]) -> None:
    with contextlib.suppress(BadMessage):
        parse_warm_spec(spec_with(files=[{**GOOD_FILE, **entry}]))
