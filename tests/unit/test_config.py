"""Configuration errors name the full key path, the value and the rule."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.config import ConfigError, parse_config


@pytest.mark.parametrize(("data", "message"), [
    ({"server": {"port": 70000}},
     "config.server.port = 70000: must be 1-65535 (0: any free port, for tests)"),
    ({"runtime": {"max_loaded": 0}}, "config.runtime.max_loaded = 0: must be greater than 0"),
    ({"download": {"stall_timeout": -1}},
     "config.download.stall_timeout = -1.0: must be greater than 0"),
    ({"download": {"retries": -2}}, "config.download.retries = -2: must not be negative"),
    ({"download": {"alow_http": True}},
     "unknown key config.download.alow_http: did you mean allow_http?"),
    ({"sever": {}}, "unknown key config.sever: did you mean server?"),
    ({"server": {"colour": "red"}}, "unknown key config.server.colour"),
    ({"server": {"port": "1000"}}, "config.server.port: expected int, got str"),
    ({"download": {"allow_http": 1}}, "config.download.allow_http: expected bool, got int"),
    ({"models": [{"id": "a", "name": "A"}]}, "config.models[0].url: required key missing"),
])
def test_errors_name_the_key_the_value_and_the_rule(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert message == str(caught.value)


def test_port_zero_is_allowed_for_tests() -> None:
    assert 0 == parse_config({"server": {"port": 0}}).server.port


def test_catalog_sources_and_the_hub_endpoint() -> None:
    config = parse_config({"models": [{"id": "a", "name": "A", "source": "hf.co/u/r:q8_0"}],
                           "hub": {"endpoint": "https://hub.example"}})
    assert ("hf.co/u/r:q8_0", None) == (config.models[0].source, config.models[0].url)
    assert "https://hub.example" == config.hub.endpoint
    assert "https://huggingface.co" == parse_config({}).hub.endpoint
    for entry, message in [
        ({"source": "hf.co/u"}, "models[0].source: 'hf.co/u' names no repository"),
        ({"source": "hf.co/u/r", "url": "https://x.example/m.gguf"},
         "models[0].source: comes instead of url, sha256 and size (the Hub gives them)"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config({"models": [{"id": "a", "name": "A", **entry}]})
        assert message in str(caught.value)
    with pytest.raises(ConfigError, match=r"config\.hub\.endpoint: plain http is refused"):
        parse_config({"hub": {"endpoint": "http://127.0.0.1:1"}})
