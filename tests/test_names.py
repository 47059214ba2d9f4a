"""One name rule (atlax/protocol/names.py): the frame codec, the configuration files, the agent's
--service flag, the certificate code and the CRD accept exactly the same names."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from atlax import certs
from atlax.config import AgentConfig, AgentSpec, ServiceSpec, parse_service_mapping
from atlax.protocol import RemoteProtocolError, names
from atlax.protocol.frames import decode_open_payload, encode_open_payload

ROOT = Path(__file__).resolve().parent.parent

SERVICES = {
    # name: valid?
    "web": True,
    "smb": True,
    "a": True,
    "9": True,
    "my_service-2": True,
    "x" * 63: True,
    "x" * 64: False,
    "": False,
    "-web": False,
    "web-": False,
    "_web": False,
    "web_": False,
    "Web": False,
    "w.eb": False,
    "w eb": False,
    "wéb": False,
    "web\n": False,
}
AGENTS = {
    "home-nas": True,
    "office.example.com": True,
    "a": True,
    "n" * 63: True,
    "n" * 64: False,
    "": False,
    "-nas": False,
    "nas.": False,
    ".nas": False,
    "Home-NAS": False,
    "home_nas": False,
    "home nas": False,
    "home-nas\n": False,
}


def _wire_accepts(name: str) -> bool:
    try:
        payload = encode_open_payload(name)
    except ValueError:
        encodable = False
    else:
        encodable = True
        assert decode_open_payload(payload).service == name
    raw = name.encode("utf-8")
    try:
        decode_open_payload(bytes([len(raw) % 256]) + raw)
    except RemoteProtocolError:
        decodable = False
    else:
        decodable = True
    assert encodable == decodable, f"encoder and decoder disagree on {name!r}"
    return encodable


def _config_accepts_service(name: str) -> bool:
    try:
        ServiceSpec(name=name, port=80)
    except ValidationError:
        spec = False
    else:
        spec = True
    try:
        AgentConfig.model_validate(
            {
                "agent": {"relay": "r:1", "ca": "c", "cert": "c", "key": "k"},
                "services": {name: "h:1"},
            }
        )
    except ValidationError:
        agent = False
    else:
        agent = True
    try:
        parse_service_mapping(f"{name}=127.0.0.1:80")
    except ValueError:
        flag = False
    else:
        flag = True
    assert spec == agent == flag, f"config places disagree on service {name!r}"
    return spec


@pytest.mark.parametrize(("name", "valid"), SERVICES.items(), ids=repr)
def test_service_names_agree_everywhere(name: str, valid: bool) -> None:
    assert names.is_service_name(name) is valid
    assert _wire_accepts(name) is valid
    assert _config_accepts_service(name) is valid


@pytest.fixture(scope="module")
def ca() -> certs.CertKeyPair:
    return certs.create_ca("Names CA")


@pytest.mark.parametrize(("name", "valid"), AGENTS.items(), ids=repr)
def test_agent_names_agree_everywhere(ca: certs.CertKeyPair, name: str, valid: bool) -> None:
    assert names.is_agent_name(name) is valid
    try:
        AgentSpec(name=name, services=())
    except ValidationError:
        config = False
    else:
        config = True
    try:
        certs.issue_client_certificate(ca, name, timedelta(days=1))
    except certs.CertificateError:
        cert = False
    else:
        cert = True
    assert config is valid and cert is valid


def test_a_bad_name_is_refused_with_the_rule() -> None:
    with pytest.raises(ValueError, match="starting and ending with a letter or digit"):
        parse_service_mapping("-web=127.0.0.1:80")
    with pytest.raises(ValidationError, match="service name '_smb' must be 1-63 characters"):
        ServiceSpec(name="_smb", port=445)


def test_the_crd_applies_the_same_rule() -> None:
    """The TunnelAgent CRD checks service names with the same pattern; agent names there are
    Kubernetes object names (no dots, at most 52), all of which the agent rule accepts."""
    crd = yaml.safe_load((ROOT / "charts/atlax/crds/tunnelagents.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    service = props["services"]["items"]["properties"]["name"]
    assert service["pattern"] == names.SERVICE_PATTERN
    assert service["maxLength"] == names.MAX_NAME_LENGTH
    agent = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"]
    agent_name = agent["properties"]["name"]
    assert agent_name["maxLength"] <= names.MAX_NAME_LENGTH

    @given(st.from_regex(agent_name["pattern"], fullmatch=True))
    def crd_names_are_agent_names(name: str) -> None:
        if len(name) <= agent_name["maxLength"]:
            assert names.is_agent_name(name)

    crd_names_are_agent_names()
