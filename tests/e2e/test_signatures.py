"""Publisher signatures: with `--require-signature PATTERN=KEYFILE`, the real huggingface_hub
client gets a matching repo's files only as its publisher's model.sig (OpenSSF model signing,
signed in the set-up with the model_signing library) lists them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from modelpeer.daemon.config import load_config
from modelpeer.daemon.errors import ConfigError
from tests.fakehub import FakeHub, expected_files
from tests.fakehub.repos import added_repo
from tests.harness import (
    HfHome,
    MiB,
    Modelpeerd,
    StartDaemon,
    cli,
    download,
    fetch,
    hf_client,
    snapshot,
)
from tests.netlab import Cluster
from tests.signing import new_key, signed_files

FILES: dict[str, dict[str, Any]] = {
    ".gitattributes": {"size": 120, "lfs": False},
    "config.json": {"size": 400, "lfs": False},
    "model.safetensors": {"size": 3 * MiB, "lfs": True},
    "sub/tokenizer.json": {"size": 2000, "lfs": False},
}


def tampered(files: dict[str, dict[str, Any]], *paths: str) -> dict[str, dict[str, Any]]:
    """The same repo with other bytes in `paths` (and the metadata to match), model.sig kept."""
    return {**files, **{p: {**files[p], "seed": "evil"} for p in paths}}


def metric(d: Modelpeerd, line_start: str) -> float:
    body = fetch(d.url + "/metrics")[2].decode()
    return float(next(line.split()[-1] for line in body.splitlines()
                      if line.startswith(line_start)))


def assert_refused(out: dict[str, Any], *words: str) -> None:
    assert out.get("error") == "HfHubHTTPError", out
    assert "403 Forbidden: signature verification failed" in out["message"], out
    for word in words:
        assert word in out["message"], (word, out)


def test_a_rule_without_a_usable_public_key_stops_the_daemon_with_the_reason(
        tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub").write_bytes(rsa_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "junk.pub").write_text("not a key\n")
    empty = tmp_path / "empty.toml"  # not the machine's /etc/modelpeer/modelpeer.toml
    empty.write_text("")
    for value, reason in ((f"acme/*={tmp_path / 'rsa.pub'}", "not an EC P-256/P-384/P-521"),
                          (f"acme/*={tmp_path / 'junk.pub'}", "not a PEM public key"),
                          (f"acme/*={tmp_path / 'none.pub'}", "cannot read the public key"),
                          ("acme/*", "expected PATTERN=KEYFILE")):
        with pytest.raises(ConfigError, match=reason):
            load_config(["--config", str(empty), "--require-signature", value], environ={})
    _, public = new_key(tmp_path, "acme")
    rules = load_config(["--config", str(empty), "--require-signature",
                         f"datasets/acme/*={public}"], environ={}).require_signature
    assert [str(r) for r in rules] == [f"datasets/acme/*={public}"]


def test_a_signed_repo_is_served_with_the_pinned_key(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub, tmp_path: Path) -> None:
    private, public = new_key(tmp_path / "keys", "acme")
    hub.add_repo("acme/signed", signed_files("acme/signed", FILES, private, tmp_path))
    d = start_daemon("--require-signature", f"acme/signed*={public}")
    assert snapshot(d, hf_home(), "acme/signed") == expected_files("acme/signed")
    assert snapshot(d, hf_home(), "acme/signed") == expected_files("acme/signed")
    assert metric(d, 'modelpeer_signatures_total{result="verified"}') == 1
    assert metric(d, "modelpeer_signature_refused_files_total") == 0
    ls = cli(d, "ls")
    assert f"(main) signed by {public}" in ls.stdout, ls.stdout
    verify = cli(d, "verify", "--signatures")
    assert verify.returncode == 0 and "all good" in verify.stdout, verify.stdout


def test_a_mirror_serving_other_bytes_with_matching_metadata_is_refused(
        hf_home: HfHome, tmp_path: Path) -> None:
    """The mirror changes an LFS file and a small one, with digests and sizes to match."""
    private, public = new_key(tmp_path / "keys", "acme")
    genuine = signed_files("acme/mirrored", FILES, private, tmp_path)
    with FakeHub(tmp_path / "mirror") as mirror:
        mirror.add_repo("acme/mirrored", tampered(genuine, "model.safetensors", "config.json"))
        with Modelpeerd(tmp_path / "cache", mirror.url, extra=[
                "--require-signature", f"acme/*={public}"]) as d:
            assert_refused(hf_client(d.url, hf_home(), "snapshot_download", "acme/mirrored"))
            for path in ("model.safetensors", "config.json"):
                assert_refused(hf_client(d.url, hf_home(), "hf_hub_download", "acme/mirrored",
                                         path), path, "its sha256 is", "the manifest signed by")
                status, headers, body = fetch(f"{d.url}/acme/mirrored/resolve/main/{path}")
                assert status == 403 and b"signature verification failed" in body
                assert headers["X-Error-Code"] == "SignatureVerificationFailed"
            assert download(d, hf_home(), "acme/mirrored", "sub/tokenizer.json") == \
                expected_files("acme/mirrored")["sub/tokenizer.json"]
            assert mirror.stats()["cdn_bytes"] == 0, "the refused LFS blob was fetched"
            assert d.status()["served_bytes"]["upstream"] < 10_000
            assert metric(d, "modelpeer_signature_refused_files_total") >= 4
            errors = " ".join(e["message"] for e in d.status()["recent_errors"])
            assert "refused acme/mirrored/model.safetensors" in errors


def test_unsigned_and_wrongly_signed_repos_are_refused_and_others_are_not_affected(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub, tmp_path: Path) -> None:
    _, public = new_key(tmp_path / "keys", "acme")
    other_private, _ = new_key(tmp_path / "keys", "other")
    hub.add_repo("acme/sig-none", FILES)
    hub.add_repo("acme/sig-other", signed_files("acme/sig-other", FILES, other_private, tmp_path))
    d = start_daemon("--require-signature", f"acme/sig-*={public}")
    assert_refused(hf_client(d.url, hf_home(), "hf_hub_download", "acme/sig-none",
                             "config.json"), "has no model.sig")
    assert_refused(hf_client(d.url, hf_home(), "hf_hub_download", "acme/sig-other",
                             "model.safetensors"), f"does not verify with {public}")
    warm = cli(d, "warm", "--wait", "acme/sig-other")
    assert warm.returncode == 1, warm.stdout + warm.stderr
    job = d.get(d.url + "/_modelpeer/v1/jobs")[0]
    assert "signature verification failed" in job["error"], job
    assert metric(d, 'modelpeer_signatures_total{result="refused"}') == 2
    assert download(d, hf_home(), "gpt2", "config.json") == expected_files("gpt2")["config.json"]
    assert snapshot(d, hf_home(), "acme/gated-model", token="hf_good_token") == \
        expected_files("acme/gated-model")


def test_a_policy_set_by_reload_stops_serving_cached_bytes_that_do_not_match(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub, tmp_path: Path) -> None:
    """Bytes cached before the rule stay on disk but go to nobody once it holds."""
    private, public = new_key(tmp_path / "keys", "acme")
    genuine = signed_files("acme/late", FILES, private, tmp_path)
    hub.add_repo("acme/late", tampered(genuine, "config.json"))
    config = tmp_path / "modelpeer.toml"
    config.write_text("")
    d = start_daemon("--config", str(config))
    assert snapshot(d, hf_home(), "acme/late") == expected_files("acme/late")
    config.write_text(f'require_signature = ["acme/late={public}"]\n')
    d.reload("require_signature is now")
    assert_refused(hf_client(d.url, hf_home(), "hf_hub_download", "acme/late", "config.json"),
                   "config.json")
    assert download(d, hf_home(), "acme/late", "model.safetensors") == \
        expected_files("acme/late")["model.safetensors"]
    verify = cli(d, "verify", "--signatures")
    assert verify.returncode == 1, verify.stdout
    assert "REFUSED acme/late/config.json" in verify.stdout, verify.stdout
    assert "1 problems" in verify.stdout
    sha256 = added_repo("acme/late", genuine).commits.popitem()[1]["config.json"].sha256
    assert sha256 in verify.stdout


@pytest.mark.netlab
def test_no_node_of_a_cluster_serves_or_relays_what_its_rule_refuses(
        cluster: Cluster, tmp_path: Path) -> None:
    """h1 cached a tampered repo before its rule came (SIGHUP); h2 has no rule and must get
    nothing of it from h1; h3 has the rule and refuses it; a genuinely signed repo still goes
    from h1 to h3 over the LAN."""
    private, public = new_key(tmp_path / "keys", "acme")
    files = {**FILES, "model.safetensors": {"size": 12 * MiB, "lfs": True}}
    genuine = signed_files("acme/evil", files, private, tmp_path)
    cluster.hub.add_repo("acme/evil", tampered(genuine, "model.safetensors", "config.json"))
    cluster.hub.add_repo("acme/good", signed_files("acme/good", files, private, tmp_path))
    config = tmp_path / "h1.toml"
    config.write_text("")
    rule = f"acme/*={public}"
    h1 = cluster.start("h1", None, "--config", str(config))
    h2 = cluster.start("h2")
    h3 = cluster.start("h3", None, "--require-signature", rule)
    cluster.wait_connected("h1", "h2", "h3")
    assert cluster.snapshot("h1", "acme/evil") == expected_files("acme/evil")
    config.write_text(f'require_signature = ["{rule}"]\n')
    h1.reload("require_signature is now", timeout=30)
    assert cluster.snapshot("h1", "acme/good") == expected_files("acme/good")
    cluster.hub.reset()
    assert cluster.snapshot("h2", "acme/evil") == expected_files("acme/evil")
    assert h2.status()["served_bytes"]["peer"] == 0, "h1 shared a repo its rule refuses"
    assert cluster.hub.stats()["cdn_bytes"] >= 12 * MiB
    assert {p["name"]: p["bytes_to"] for p in cluster.peers("h1")}["h2"] == 0
    home = tmp_path / "hf-h3"
    home.mkdir()
    for node, host in ((h1, "h1"), (h3, "h3")):
        assert_refused(hf_client(node.url, home, "hf_hub_download", "acme/evil",
                                 "model.safetensors", prefix_cmd=cluster.lab.ns(host)),
                       "model.safetensors")
    assert h3.status()["upstream_bytes"] < MiB, "h3 fetched the refused blob"
    cluster.hub.reset()
    assert cluster.snapshot("h3", "acme/good") == expected_files("acme/good")
    assert h3.status()["served_bytes"]["peer"] >= 12 * MiB
