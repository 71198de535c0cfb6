"""The Hub token's rules: which urls get it, where it is read from, where it never shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import ConfigError, parse_config
from supervisor.hub import HubAccess, load_access

TOKEN = "hf_" + "UnitTestToken" * 3


def test_the_token_goes_to_the_endpoint_origin_only() -> None:
    access = HubAccess("https://huggingface.co", TOKEN)
    assert (("Authorization", f"Bearer {TOKEN}"),) == access.headers_for(
        "https://huggingface.co/u/r/resolve/abc/m.gguf")
    assert (("Authorization", f"Bearer {TOKEN}"),) == access.headers_for(
        "https://HuggingFace.co/u/r/resolve/abc/m.gguf")
    for other in ("https://cdn-lfs.huggingface.co/x", "http://huggingface.co/u/r",
                  "https://huggingface.co:8443/u/r", "https://huggingface.co.evil.example/x",
                  "https://evil.example/?https://huggingface.co/"):
        assert () == access.headers_for(other), other
    assert () == HubAccess("https://huggingface.co").headers_for("https://huggingface.co/x")
    assert TOKEN not in repr(access)


def test_token_from_the_file_else_hf_token(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")
    assert "hf_fromTheEnvironment" == load_access("https://h", "").token
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert TOKEN == load_access("https://h", str(path)).token  # the config's file wins
    monkeypatch.delenv("HF_TOKEN")
    assert load_access("https://h", "").token is None
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_access("https://h", str(path))
    path.write_text("two words")
    with pytest.raises(ValueError) as spaced:
        load_access("https://h", str(path))
    assert "two" not in str(spaced.value)
    with pytest.raises(OSError):
        load_access("https://h", str(tmp_path / "missing"))


def test_hub_config_keys_and_hf_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    default = parse_config({})
    assert ("https://huggingface.co", "", "1h") == (
        default.hub.endpoint, default.hub.token_file, default.hub.update_check)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    assert "https://hub.example" == parse_config({}).hub.endpoint
    assert "https://mine.example" == parse_config(
        {"hub": {"endpoint": "https://mine.example"}}).hub.endpoint
    assert "0" == parse_config({"hub": {"update_check": "0"}}).hub.update_check
    with pytest.raises(ConfigError, match="update_check"):
        parse_config({"hub": {"update_check": "-1"}})


async def test_a_redirect_to_another_origin_drops_the_headers_for_good() -> None:
    """The probe follows redirects by hand: its own headers go to the url's origin and stop
    at the first hop elsewhere, even when a later hop comes back (the one rule)."""
    import httpx
    import trio

    from actors.download.origin import probe_once
    from tests.origin import Origin, open_origin

    header = (("Authorization", f"Bearer {TOKEN}"),)
    with trio.fail_after(10):
        async with open_origin() as hub, open_origin() as cdn:
            hub.add("/direct", b"x" * 100)
            hub.redirect("/same", "/direct")
            hub.redirect("/away", cdn.url("/back"))
            cdn.redirect("/back", hub.url("/direct"))
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
                kept = await probe_once(client, httpx.URL(hub.url("/same")), allow_http=True,
                                        stall_timeout=5, own_headers=header)
                dropped = await probe_once(client, httpx.URL(hub.url("/away")),
                                           allow_http=True, stall_timeout=5,
                                           own_headers=header)

            def auth(origin: Origin, path: str) -> list[str | None]:
                return [dict(r.headers).get("authorization") for r in origin.seen(path)]

    assert (True, False) == (kept.credentialed, dropped.credentialed)
    bearer = f"Bearer {TOKEN}"
    assert [bearer] == auth(hub, "/same")
    assert [bearer] == auth(hub, "/away")
    assert [None] == auth(cdn, "/back")
    assert [bearer, None] == auth(hub, "/direct")  # came back: still without it
