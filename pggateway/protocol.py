"""PostgreSQL protocol v3 framing: building and parsing the messages the gateway handles.

No I/O here, so every rule can be unit-tested. The relay reads only message *headers* on the hot
path (a type byte and a length); bodies are parsed only for the few messages whose content
matters to pooling (Query, Parse, ReadyForQuery, ParameterStatus).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Codes of the untyped startup packets (the first message a client sends).
PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
# PostgreSQL refuses larger startup packets for the same reason: they arrive unauthenticated.
MAX_STARTUP_PACKET = 10000

# Frontend (client → server) message types.
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
EXECUTE = ord("E")
DESCRIBE = ord("D")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
TERMINATE = ord("X")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse and SASLResponse share it

# Backend (server → client) message types.
AUTHENTICATION = ord("R")
PARAMETER_STATUS = ord("S")
BACKEND_KEY_DATA = ord("K")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NEGOTIATE_PROTOCOL_VERSION = ord("v")

# Authentication request codes.
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_HEADER = struct.Struct("!BI")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I32x2 = struct.Struct("!ii")


class ProtocolError(Exception):
    """The peer broke the protocol (bad length, unknown packet, malformed body)."""


# -- building ---------------------------------------------------------------------------------


def message(kind: int, payload: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (including itself), payload."""
    return _HEADER.pack(kind, len(payload) + 4) + payload


def _cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


def error_response(
    severity: str,
    sqlstate: str,
    text: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (or NoticeResponse) with the fields drivers read: S, V, C, M, D, H."""
    body = b"S" + _cstr(severity) + b"V" + _cstr(severity) + b"C" + _cstr(sqlstate) + b"M" + _cstr(text)
    if detail:
        body += b"D" + _cstr(detail)
    if hint:
        body += b"H" + _cstr(hint)
    return message(NOTICE_RESPONSE if notice else ERROR_RESPONSE, body + b"\x00")


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(AUTHENTICATION, _I32.pack(code) + data)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\x00")


def parameter_status(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(BACKEND_KEY_DATA, _I32x2.pack(pid, secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(READY_FOR_QUERY, status)


def negotiate_protocol_version(minor: int, unsupported: Iterable[str]) -> bytes:
    names = list(unsupported)
    return message(
        NEGOTIATE_PROTOCOL_VERSION,
        _I32.pack(minor) + _I32.pack(len(names)) + b"".join(_cstr(n) for n in names),
    )


def startup_message(params: Mapping[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32x2.pack(8, SSL_REQUEST)


def cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST) + _I32x2.pack(pid, secret)


def query(sql: str) -> bytes:
    return message(QUERY, _cstr(sql))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(PASSWORD, _cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(PASSWORD, data)


def password_message(password: str) -> bytes:
    return message(PASSWORD, _cstr(password))


TERMINATE_MESSAGE = message(TERMINATE)


# -- parsing ----------------------------------------------------------------------------------


@dataclass
class StartupPacket:
    """The first packet of a connection: a request code and, for a StartupMessage, parameters."""

    code: int
    params: dict[str, str] = field(default_factory=dict)
    # CancelRequest only.
    pid: int = 0
    secret: int = 0

    @property
    def major(self) -> int:
        return self.code >> 16

    @property
    def minor(self) -> int:
        return self.code & 0xFFFF


def startup_length(head: bytes) -> int:
    """The declared length of a startup packet from its first four bytes, validated."""
    (length,) = _I32.unpack_from(head, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolError(f"invalid startup packet length {length}")
    return int(length)


def parse_startup(packet: bytes) -> StartupPacket:
    """Parse a whole startup packet (length word included)."""
    if len(packet) < 8:
        raise ProtocolError("startup packet too short")
    (code,) = _I32.unpack_from(packet, 4)
    if code == CANCEL_REQUEST:
        if len(packet) != 16:
            raise ProtocolError("malformed CancelRequest")
        pid, secret = _I32x2.unpack_from(packet, 8)
        return StartupPacket(code, pid=pid, secret=secret)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        return StartupPacket(code)
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    parts = packet[8:].split(b"\x00")
    # A well-formed list ends with an empty name: "k\0v\0...\0" splits into [..., "", ""].
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2 != 0:
        raise ProtocolError("malformed startup parameters")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts) - 2, 2):
            params[parts[i].decode()] = parts[i + 1].decode()
    except UnicodeDecodeError:
        raise ProtocolError("startup parameters are not UTF-8") from None
    return StartupPacket(code, params)


def parse_options(options: str) -> dict[str, str]:
    """GUCs from the `options` startup parameter (`-c name=value` and `--name=value`, as libpq
    passes PGOPTIONS); anything else is ignored, since it would configure the server process."""
    out: dict[str, str] = {}
    tokens: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        tokens.append("".join(cur))
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        setting = None
        if tok == "-c" and i + 1 < len(tokens):
            setting, i = tokens[i + 1], i + 1
        elif tok.startswith("-c"):
            setting = tok[2:]
        elif tok.startswith("--"):
            setting = tok[2:]
        if setting and "=" in setting:
            name, value = setting.split("=", 1)
            out[name.replace("-", "_")] = value
        i += 1
    return out


def iter_messages(buf: bytes | bytearray | memoryview) -> tuple[list[tuple[int, int, int]], int]:
    """Split a buffer into complete messages: ([(type, start, end)], bytes consumed).

    `start` is the offset of the type byte and `end` one past the message; an incomplete trailing
    message is left for the next read.
    """
    out: list[tuple[int, int, int]] = []
    pos, n = 0, len(buf)
    unpack = _HEADER.unpack_from
    while pos + 5 <= n:
        kind, length = unpack(buf, pos)
        if length < 4:
            raise ProtocolError(f"invalid message length {length}")
        end = pos + 1 + length
        if end > n:
            break
        out.append((kind, pos, end))
        pos = end
    return out, pos


def read_cstr(buf: bytes | memoryview, pos: int) -> tuple[str, int]:
    """A NUL-terminated string at pos: (value, position after the NUL)."""
    data = bytes(buf)
    end = data.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("unterminated string")
    return data[pos:end].decode(errors="replace"), end + 1


def parse_fields(payload: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse body, by their one-letter codes."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        code = chr(payload[pos])
        value, pos = read_cstr(payload, pos + 1)
        out[code] = value
    return out


def is_fatal(error_body: bytes) -> bool:
    """Whether an ErrorResponse body is FATAL or PANIC (the server closes the connection next)."""
    fields = parse_fields(error_body)
    return fields.get("V", fields.get("S", "")) in ("FATAL", "PANIC")


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    name, pos = read_cstr(payload, 0)
    value, _ = read_cstr(payload, pos)
    return name, value


def parse_parse(payload: bytes | bytearray | memoryview) -> tuple[str, str]:
    """A Parse message body: (statement name, query text)."""
    data = bytes(payload)
    name_end = data.find(b"\x00")
    query_end = data.find(b"\x00", name_end + 1)
    if name_end < 0 or query_end < 0:
        raise ProtocolError("malformed Parse message")
    return data[:name_end].decode(errors="replace"), data[name_end + 1 : query_end].decode(errors="replace")


def parse_query(payload: bytes | bytearray | memoryview) -> str:
    data = bytes(payload)
    end = data.find(b"\x00")
    return (data if end < 0 else data[:end]).decode(errors="replace")


def parse_sasl_initial(payload: bytes) -> tuple[str, bytes]:
    """A SASLInitialResponse body: (mechanism, client-first-message)."""
    mech, pos = read_cstr(payload, 0)
    if pos + 4 > len(payload):
        raise ProtocolError("malformed SASLInitialResponse")
    (length,) = _I32.unpack_from(payload, pos)
    data = payload[pos + 4 :]
    if length != len(data):
        raise ProtocolError("malformed SASLInitialResponse")
    return mech, data


def parse_auth(payload: bytes) -> tuple[int, bytes]:
    """An Authentication message body: (code, data)."""
    if len(payload) < 4:
        raise ProtocolError("malformed Authentication message")
    return _I32.unpack_from(payload, 0)[0], payload[4:]


def parse_backend_key(payload: bytes) -> tuple[int, int]:
    if len(payload) < 8:
        raise ProtocolError("malformed BackendKeyData")
    pid, secret = _I32x2.unpack_from(payload, 0)
    return pid, secret


class ServerStreamScanner:
    """Follows message boundaries in the backend → client stream without buffering it.

    The relay forwards every byte as it arrives; this only remembers where the current message
    ends, and picks out the few messages pooling needs: ReadyForQuery (whose status byte says
    when the backend can be returned), ParameterStatus (the backend's reported settings) and
    ErrorResponse (rare; a FATAL one means the compute is ending this backend). Large DataRows
    therefore pass through with no copy.

    `feed` is the relay's per-read cost, so it allocates nothing for the common case: it returns
    how many ReadyForQuery messages the chunk completed, leaves the last one's status in
    `status`, and appends (type, body) of the rare ParameterStatus and ErrorResponse messages to
    `others`, which the caller empties.
    """

    __slots__ = ("_body", "_head", "_kind", "_remaining", "others", "status")

    # Collected across reads when split; ReadyForQuery is the one looked at inline.
    OTHERS = frozenset((PARAMETER_STATUS, ERROR_RESPONSE))

    def __init__(self) -> None:
        self._head = b""  # a partial 5-byte header
        self._kind = 0
        self._remaining = 0  # body bytes of the current message not seen yet
        self._body: bytearray | None = None  # collected body of a split wanted message
        self.status = b"I"
        self.others: list[tuple[int, bytes]] = []

    def reset(self) -> None:
        self._head, self._kind, self._remaining, self._body = b"", 0, 0, None

    @property
    def at_boundary(self) -> bool:
        return not self._head and self._remaining == 0

    def feed(self, data: bytes) -> int:
        """The number of ReadyForQuery messages this chunk completed (see the class)."""
        ready = 0
        pos, n = 0, len(data)
        if self._remaining:
            take = self._remaining if self._remaining < n else n
            if self._body is not None:
                self._body += data[:take]
            self._remaining -= take
            pos = take
            if self._remaining == 0 and self._body is not None:
                ready += self._complete(self._kind, bytes(self._body))
                self._body = None
        if self._head:
            # A header split across reads (a partial header never coexists with _remaining).
            data = self._head + data
            self._head = b""
            n = len(data)
        unpack = _HEADER.unpack_from
        while pos < n:
            if pos + 5 > n:
                self._head = bytes(data[pos:])
                break
            kind, length = unpack(data, pos)
            if length < 4:
                raise ProtocolError(f"invalid message length {length}")
            end = pos + 1 + length
            if end <= n:
                if kind == READY_FOR_QUERY:
                    ready += 1
                    self.status = data[pos + 5 : pos + 6]
                elif kind == PARAMETER_STATUS or kind == ERROR_RESPONSE:
                    self.others.append((kind, bytes(data[pos + 5 : end])))
                pos = end
                continue
            self._kind = kind
            self._remaining = end - n
            wanted = kind == READY_FOR_QUERY or kind in self.OTHERS
            self._body = bytearray(data[pos + 5 : n]) if wanted else None
            break
        return ready

    def _complete(self, kind: int, body: bytes) -> int:
        if kind == READY_FOR_QUERY:
            self.status = body[:1]
            return 1
        self.others.append((kind, body))
        return 0
