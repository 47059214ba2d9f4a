"""Frame layout: the 12-byte header and the payload codecs (the decoder is `decoder.py`).

Nothing here keeps per-stream state; `connection.py` does.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from .errors import RemoteProtocolError
from .names import SERVICE_RULE, is_service_name

HEADER = struct.Struct("!IIBBH")
HEADER_SIZE = HEADER.size  # 12
MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1
MIN_MAX_FRAME_SIZE = 16_384
MAX_MAX_FRAME_SIZE = 16_777_215
ALPN = "atlax/1"

Payload = bytes | bytearray  # a bytearray when the decoder read it into a buffer of its own
_U32 = struct.Struct("!I")
_GOAWAY = struct.Struct("!II")
_SETTING = struct.Struct("!HI")


class FrameType(enum.IntEnum):
    DATA = 0x0
    OPEN = 0x1
    WINDOW_UPDATE = 0x2
    RESET = 0x3
    PING = 0x4
    GOAWAY = 0x5
    SETTINGS = 0x6
    # The cluster extension's frames: they exist only where the receiver announced the extension
    # in its SETTINGS (the connection checks that, and everything else about them).
    CLUSTER = 0x7  # relay -> agent: u32 cluster size
    JOIN = 0x8  # agent -> relay: u32 instance id of the relay


class Flag(enum.IntFlag):
    FIN = 0x1
    ACK = 0x2


class SettingId(enum.IntEnum):
    INITIAL_WINDOW = 0x1
    MAX_FRAME_SIZE = 0x2
    MAX_STREAMS = 0x3
    DATAGRAMS = 0x4  # sent only when 1, so older peers see the SETTINGS they always saw
    INSTANCE_ID = 0x5  # relay: its instance id (cluster extension)
    CLUSTER_SIZE = 0x6  # relay: the instances it expects, itself included
    TUNNEL_POOL = 0x7  # agent: 1 = it keeps a tunnel per instance and speaks the extension


class OptionType(enum.IntEnum):
    ORIGIN = 0x01
    PROXY_PROTOCOL = 0x02
    DATAGRAM = 0x03  # the stream is a UDP flow of length-prefixed datagrams (datagrams.py)


EXTENSION_FRAMES = frozenset({FrameType.CLUSTER, FrameType.JOIN})
MAX_INSTANCE_ID = 2**32 - 1
MAX_CLUSTER_SIZE = 65_535


@dataclass(slots=True)  # not frozen: one is made per frame, and frozen doubles that cost
class Frame:
    type: FrameType
    flags: int
    stream_id: int
    payload: Payload


@dataclass(frozen=True, slots=True)
class Settings:
    """What the *sender* of a SETTINGS frame accepts, and (cluster extension) who it is.

    `instance_id` and `cluster_size` are a relay instance's (0: not sent), `tunnel_pool` a pool
    agent's (sent only when true), so a peer without them sends the SETTINGS it always sent.
    """

    initial_window: int = 262_144
    max_frame_size: int = MIN_MAX_FRAME_SIZE
    max_streams: int = 1024
    datagrams: bool = False  # the peer may open datagram streams (UDP flows) toward the sender
    instance_id: int = 0
    cluster_size: int = 0
    tunnel_pool: bool = False

    def validate(self, error: type[Exception] = ValueError) -> None:
        if not 1024 <= self.initial_window <= MAX_WINDOW:
            raise error(f"INITIAL_WINDOW {self.initial_window} out of range 1024..{MAX_WINDOW}")
        if not MIN_MAX_FRAME_SIZE <= self.max_frame_size <= MAX_MAX_FRAME_SIZE:
            raise error(
                f"MAX_FRAME_SIZE {self.max_frame_size} out of range "
                f"{MIN_MAX_FRAME_SIZE}..{MAX_MAX_FRAME_SIZE}"
            )
        if not 0 <= self.max_streams <= MAX_STREAM_ID:
            raise error(f"MAX_STREAMS {self.max_streams} out of range 0..{MAX_STREAM_ID}")
        if not 0 <= self.instance_id <= MAX_INSTANCE_ID:
            raise error(f"INSTANCE_ID {self.instance_id} out of range 1..{MAX_INSTANCE_ID}")
        if not 0 <= self.cluster_size <= MAX_CLUSTER_SIZE:
            raise error(f"CLUSTER_SIZE {self.cluster_size} out of range 1..{MAX_CLUSTER_SIZE}")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a public client came from and which relay address it reached (PROXY protocol)."""

    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    source_port: int
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination_port: int

    def __post_init__(self) -> None:
        if self.source.version != self.destination.version:
            raise ValueError("origin source and destination must be the same address family")


# -- encoding ------------------------------------------------------------------------------------


def encode_header(type_: FrameType, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(stream_id, length, type_, flags, 0)


def encode_frame(type_: FrameType, flags: int, stream_id: int, payload: Payload = b"") -> bytes:
    return HEADER.pack(stream_id, len(payload), type_, flags, 0) + payload


def encode_settings(settings: Settings) -> bytes:
    pairs = [
        (SettingId.INITIAL_WINDOW, settings.initial_window),
        (SettingId.MAX_FRAME_SIZE, settings.max_frame_size),
        (SettingId.MAX_STREAMS, settings.max_streams),
    ]
    if settings.datagrams:
        pairs.append((SettingId.DATAGRAMS, 1))
    if settings.instance_id:
        pairs.append((SettingId.INSTANCE_ID, settings.instance_id))
    if settings.cluster_size:
        pairs.append((SettingId.CLUSTER_SIZE, settings.cluster_size))
    if settings.tunnel_pool:
        pairs.append((SettingId.TUNNEL_POOL, 1))
    payload = b"".join(_SETTING.pack(ident, value) for ident, value in pairs)
    return encode_frame(FrameType.SETTINGS, 0, 0, payload)


def encode_open_payload(
    service: str,
    origin: Origin | None = None,
    proxy_protocol: int | None = None,
    datagram: bool = False,
) -> bytes:
    if not is_service_name(service):
        raise ValueError(f"service name {service!r} must be {SERVICE_RULE}")
    if datagram and proxy_protocol is not None:
        raise ValueError("a datagram stream cannot carry the PROXY protocol")
    name = service.encode("ascii")
    parts = [bytes([len(name)]), name]
    if origin is not None:
        value = (
            bytes([origin.source.version])
            + origin.source.packed
            + origin.source_port.to_bytes(2, "big")
            + origin.destination.packed
            + origin.destination_port.to_bytes(2, "big")
        )
        parts += [bytes([OptionType.ORIGIN]), len(value).to_bytes(2, "big"), value]
    if proxy_protocol is not None:
        parts += [bytes([OptionType.PROXY_PROTOCOL]), b"\x00\x01", bytes([proxy_protocol])]
    if datagram:
        parts += [bytes([OptionType.DATAGRAM]), b"\x00\x00"]
    return b"".join(parts)


def encode_goaway_payload(last_stream_id: int, error_code: int, message: str) -> bytes:
    return _GOAWAY.pack(last_stream_id, error_code) + message.encode("utf-8")


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


# -- decoding ------------------------------------------------------------------------------------


def decode_u32(payload: Payload) -> int:
    value: int = _U32.unpack(payload)[0]
    return value


_SETTING_IDS = {int(s): s for s in SettingId}


def decode_settings(payload: Payload) -> Settings:
    default = Settings()
    values = {
        SettingId.INITIAL_WINDOW: default.initial_window,
        SettingId.MAX_FRAME_SIZE: default.max_frame_size,
        SettingId.MAX_STREAMS: default.max_streams,
        SettingId.DATAGRAMS: int(default.datagrams),
    }
    for ident, value in _SETTING.iter_unpack(payload):
        known = _SETTING_IDS.get(ident)
        if known is not None:  # unknown ids are ignored
            values[known] = value
    if values[SettingId.DATAGRAMS] > 1:
        raise RemoteProtocolError(f"DATAGRAMS {values[SettingId.DATAGRAMS]} out of range 0..1")
    # The cluster extension's ids have no default: sent, they must be in range (0 is not).
    if values.get(SettingId.INSTANCE_ID, 1) == 0:
        raise RemoteProtocolError(f"INSTANCE_ID 0 out of range 1..{MAX_INSTANCE_ID}")
    if values.get(SettingId.CLUSTER_SIZE, 1) == 0:
        raise RemoteProtocolError(f"CLUSTER_SIZE 0 out of range 1..{MAX_CLUSTER_SIZE}")
    pool = values.get(SettingId.TUNNEL_POOL, 0)
    if pool > 1:
        raise RemoteProtocolError(f"TUNNEL_POOL {pool} out of range 0..1")
    settings = Settings(
        initial_window=values[SettingId.INITIAL_WINDOW],
        max_frame_size=values[SettingId.MAX_FRAME_SIZE],
        max_streams=values[SettingId.MAX_STREAMS],
        datagrams=values[SettingId.DATAGRAMS] == 1,
        instance_id=values.get(SettingId.INSTANCE_ID, 0),
        cluster_size=values.get(SettingId.CLUSTER_SIZE, 0),
        tunnel_pool=pool == 1,
    )
    settings.validate(RemoteProtocolError)
    return settings


@dataclass(frozen=True, slots=True)
class OpenRequest:
    service: str
    origin: Origin | None = None
    proxy_protocol: int | None = None
    datagram: bool = False


def decode_open_payload(payload: Payload) -> OpenRequest:
    if not payload:
        raise RemoteProtocolError("OPEN without a service name")
    end = 1 + payload[0]
    raw = payload[1:end]
    if len(raw) != payload[0]:
        raise RemoteProtocolError("OPEN service name is truncated")
    service = raw.decode("ascii", errors="replace")
    if not is_service_name(service):
        raise RemoteProtocolError(f"OPEN service name {service!r} is not {SERVICE_RULE}")
    origin: Origin | None = None
    proxy_protocol: int | None = None
    datagram = False
    pos = end
    while pos < len(payload):
        if pos + 3 > len(payload):
            raise RemoteProtocolError("OPEN option header is truncated")
        kind = payload[pos]
        length = int.from_bytes(payload[pos + 1 : pos + 3], "big")
        value = payload[pos + 3 : pos + 3 + length]
        if len(value) != length:
            raise RemoteProtocolError("OPEN option value is truncated")
        pos += 3 + length
        if kind == OptionType.ORIGIN:
            origin = _decode_origin(value)
        elif kind == OptionType.PROXY_PROTOCOL:
            if len(value) != 1 or value[0] != 2:
                raise RemoteProtocolError("OPEN PROXY_PROTOCOL option must name version 2")
            proxy_protocol = 2
        elif kind == OptionType.DATAGRAM:
            if length:
                raise RemoteProtocolError("OPEN DATAGRAM option must be empty")
            datagram = True
    if datagram and proxy_protocol is not None:
        raise RemoteProtocolError("OPEN of a datagram stream cannot ask for the PROXY protocol")
    return OpenRequest(service, origin, proxy_protocol, datagram)


def _decode_origin(value: Payload) -> Origin:
    sizes = {4: 4, 6: 16}
    if not value or value[0] not in sizes or len(value) != 1 + 2 * (sizes[value[0]] + 2):
        raise RemoteProtocolError("OPEN ORIGIN option is malformed")
    n = sizes[value[0]]
    addr = ipaddress.IPv4Address if n == 4 else ipaddress.IPv6Address
    src = addr(value[1 : 1 + n])
    src_port = int.from_bytes(value[1 + n : 3 + n], "big")
    dst = addr(value[3 + n : 3 + 2 * n])
    dst_port = int.from_bytes(value[3 + 2 * n : 5 + 2 * n], "big")
    return Origin(src, src_port, dst, dst_port)


def decode_goaway_payload(payload: Payload) -> tuple[int, int, str]:
    last_stream_id, code = _GOAWAY.unpack_from(payload)
    if last_stream_id > MAX_STREAM_ID:
        raise RemoteProtocolError("GOAWAY last stream id has the reserved bit set")
    try:
        message = payload[8:].decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("GOAWAY message is not UTF-8") from None
    return last_stream_id, code, message
