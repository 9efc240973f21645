"""SQL-level prepared statements: `PREPARE`, `EXECUTE` and `DEALLOCATE` read with certainty.

The gateway keeps a client's SQL-prepared statements itself (pggateway/prepared.py), so it has to
know exactly what a Query says: the statement's name as PostgreSQL stores it (unquoted names
folded to lower case, quoted ones as written), the parameter types as OIDs (a backend that never
saw the PREPARE gets the statement as a protocol Parse), and where the name is in the text (to
put the gateway's own name there). A small lexer does it, following PostgreSQL's scanner for what
matters here: `--` and nested `/* */` comments, '…' literals, E'…', B'…', X'…', N'…',
dollar quoting, quoted identifiers. Anything it cannot read with certainty gives None, and the
caller treats the Query as before (a PREPARE then pins the session):

- more than one statement, or text after the statement other than comments;
- a backslash in a plain '…' literal (its meaning depends on standard_conforming_strings), a
  U&'…' or U&"…" literal, anything unterminated, a non-ASCII byte in an unquoted identifier
  (case folding of those depends on the encoding), a name longer than 63 bytes (PostgreSQL
  truncates it with a NOTICE);
- a reserved keyword as a name (PostgreSQL refuses it; the rewritten text would not);
- a parameter type outside the table below. Types are resolved without the server: the SQL
  keyword types (`int`, `double precision`, `character varying(n)`, `timestamp with time zone`,
  …), which the grammar maps to pg_catalog, and the common built-in names, unqualified or
  `pg_catalog.`-qualified, each with `[]` for its array type. The text sent to the server names
  them `pg_catalog.<name>`, so every backend resolves them alike whatever the search_path.

The lexer reads the text as Latin-1, one character per byte: every byte it looks at is ASCII, and
offsets stay byte offsets into the client's own encoding (all of PostgreSQL's client encodings
keep ASCII quotes and semicolons as themselves).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

NAMEDATALEN = 64

# Reserved and type/function-name keywords (PostgreSQL's kwlist.h): not a valid statement name
# unquoted. ALL is handled by DEALLOCATE itself.
_NOT_NAMES = frozenset(
    """
    all analyse analyze and any array as asc asymmetric both case cast check collate column
    constraint create current_catalog current_date current_role current_time current_timestamp
    current_user default deferrable desc distinct do else end except false fetch for foreign
    from grant group having in initially intersect into lateral leading limit localtime
    localtimestamp not null offset on only or order placing primary references returning select
    session_user some symmetric system_user table then to trailing true union unique user using
    variadic when where window with
    authorization binary collation concurrently cross current_schema freeze full ilike inner is
    isnull join left like natural notnull outer overlaps right similar tablesample verbose
    transaction
    """.split()
)

# name → (oid, array oid, takes a type modifier (max args, limits)).
_GENERIC: dict[str, tuple[int, int]] = {
    "bool": (16, 1000),
    "bytea": (17, 1001),
    "name": (19, 1003),
    "int8": (20, 1016),
    "int2": (21, 1005),
    "int4": (23, 1007),
    "text": (25, 1009),
    "oid": (26, 1028),
    "json": (114, 199),
    "xml": (142, 143),
    "float4": (700, 1021),
    "float8": (701, 1022),
    "money": (790, 791),
    "inet": (869, 1041),
    "cidr": (650, 651),
    "macaddr": (829, 1040),
    "bpchar": (1042, 1014),
    "varchar": (1043, 1015),
    "date": (1082, 1182),
    "time": (1083, 1183),
    "timestamp": (1114, 1115),
    "timestamptz": (1184, 1185),
    "interval": (1186, 1187),
    "timetz": (1266, 1270),
    "bit": (1560, 1561),
    "varbit": (1562, 1563),
    "numeric": (1700, 1231),
    "uuid": (2950, 2951),
    "jsonb": (3802, 3807),
}
# Keyword spellings (one or more words) → the pg_catalog name the grammar gives them.
_KEYWORDS: dict[tuple[str, ...], str] = {
    ("smallint",): "int2",
    ("int",): "int4",
    ("integer",): "int4",
    ("bigint",): "int8",
    ("real",): "float4",
    ("float",): "float8",
    ("double", "precision"): "float8",
    ("boolean",): "bool",
    ("numeric",): "numeric",
    ("decimal",): "numeric",
    ("dec",): "numeric",
    ("varchar",): "varchar",
    ("character", "varying"): "varchar",
    ("char", "varying"): "varchar",
    ("character",): "bpchar",
    ("char",): "bpchar",
    ("bit",): "bit",
    ("bit", "varying"): "varbit",
    ("timestamp",): "timestamp",
    ("timestamp", "without", "time", "zone"): "timestamp",
    ("timestamp", "with", "time", "zone"): "timestamptz",
    ("time",): "time",
    ("time", "without", "time", "zone"): "time",
    ("time", "with", "time", "zone"): "timetz",
    ("interval",): "interval",
}
# Type modifiers accepted, with bounds every supported PostgreSQL accepts (so a statement the
# backend already has, which skips the server's check, could not have failed it).
_TYPMODS: dict[str, tuple[tuple[int, int], ...]] = {
    "numeric": ((1, 1000), (0, 1000)),
    "varchar": ((1, 10485760),),
    "bpchar": ((1, 10485760),),
    "bit": ((1, 83886080),),
    "varbit": ((1, 83886080),),
    "timestamp": ((0, 6),),
    "timestamptz": ((0, 6),),
    "time": ((0, 6),),
    "timetz": ((0, 6),),
}
# Where the grammar puts a keyword type's precision: `timestamp(3) with time zone`.
_ZONED = frozenset(("timestamp", "time"))

_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_PARAM = re.compile(r"\$[0-9]+")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?")
_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS = _IDENT_START | frozenset("0123456789$")

# Token kinds.
WORD = "w"  # an unquoted identifier or keyword, lower-cased
QUOTED = "q"  # a quoted identifier, unescaped
LITERAL = "l"  # any string literal
OTHER = "o"  # a number, parameter, operator or punctuation character


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


class Unreadable(Exception):
    """The text cannot be read with certainty."""


def tokens(sql: str) -> tuple[list[Token], int]:
    """The tokens of the first statement and the offset where it ends (its `;` or the end).
    Unreadable when anything but whitespace, comments and empty statements follows it."""
    out: list[Token] = []
    i, n = 0, len(sql)
    end = -1
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c.isspace():
            i += 1
        elif c == "-" and nxt == "-":
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and nxt == "*":
            i = _block_comment(sql, i)
        elif c == ";":
            if end < 0:
                end = i
            i += 1
        elif end >= 0:
            raise Unreadable("more than one statement")
        elif c == "'":
            j = _string(sql, i, backslashes=False)
            out.append(Token(LITERAL, "", i, j))
            i = j
        elif c == '"':
            j, text = _quoted(sql, i)
            out.append(Token(QUOTED, text, i, j))
            i = j
        elif c == "$":
            m = _PARAM.match(sql, i)
            if m is not None:
                out.append(Token(OTHER, m.group(0), i, m.end()))
                i = m.end()
                continue
            m = _DOLLAR_TAG.match(sql, i)
            if m is None:
                raise Unreadable("a stray $")
            tag = m.group(0)
            j = sql.find(tag, m.end())
            if j < 0:
                raise Unreadable("unterminated dollar quote")
            out.append(Token(LITERAL, "", i, j + len(tag)))
            i = j + len(tag)
        elif c in _IDENT_START or c >= "\x80":
            j = i + 1
            while j < n and (sql[j] in _IDENT_CHARS or sql[j] >= "\x80"):
                j += 1
            word = sql[i:j]
            low = word.lower()
            if j < n and sql[j] == "'" and low in ("e", "b", "x", "n"):
                j = _string(sql, j, backslashes=low == "e")
                out.append(Token(LITERAL, "", i, j))
            elif j < n and sql[j] in "'\"&" and low == "u":
                raise Unreadable("a Unicode-escape literal")
            else:
                if not word.isascii():
                    raise Unreadable("a non-ASCII unquoted identifier")
                out.append(Token(WORD, low, i, j))
            i = j
        elif c.isdigit() or (c == "." and nxt.isdigit()):
            m = _NUMBER.match(sql, i)
            assert m is not None
            j = m.end()
            if j < n and (sql[j] in _IDENT_CHARS or sql[j] >= "\x80"):
                raise Unreadable("junk after a number")
            out.append(Token(OTHER, m.group(0), i, j))
            i = j
        else:
            out.append(Token(OTHER, c, i, i + 1))
            i += 1
    return out, (n if end < 0 else end)


def _block_comment(sql: str, i: int) -> int:
    depth, n = 0, len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    raise Unreadable("unterminated comment")


def _string(sql: str, i: int, *, backslashes: bool) -> int:
    j, n = i + 1, len(sql)
    while j < n:
        c = sql[j]
        if c == "\\":
            if not backslashes:
                raise Unreadable("a backslash in a plain literal")
            j += 2
            continue
        if c == "'":
            if j + 1 < n and sql[j + 1] == "'":
                j += 2
                continue
            return j + 1
        j += 1
    raise Unreadable("unterminated literal")


def _quoted(sql: str, i: int) -> tuple[int, str]:
    j, n = i + 1, len(sql)
    while j < n:
        if sql[j] == '"':
            if j + 1 < n and sql[j + 1] == '"':
                j += 2
                continue
            text = sql[i + 1 : j].replace('""', '"')
            if not text:
                raise Unreadable("a zero-length identifier")
            return j + 1, text
        j += 1
    raise Unreadable("unterminated identifier")


def _name(tok: Token | None) -> bytes:
    """The statement name a token stands for, as PostgreSQL stores it."""
    if tok is None:
        raise Unreadable("no name")
    if tok.kind == WORD:
        if tok.text in _NOT_NAMES:
            raise Unreadable("a reserved keyword as a name")
        name = tok.text
    elif tok.kind == QUOTED:
        name = tok.text
    else:
        raise Unreadable("not a name")
    raw = name.encode("latin-1")
    if len(raw) >= NAMEDATALEN or b"\x00" in raw:
        raise Unreadable("a name PostgreSQL would truncate")
    return raw


@dataclass(frozen=True, slots=True)
class Prepare:
    """`PREPARE name [(types)] AS statement`."""

    name: bytes
    name_start: int
    name_end: int
    types: tuple[int, ...]
    # The types as sent on: pg_catalog-qualified, in the client's own order.
    type_sql: str
    statement: bytes  # the prepared statement's text, as a protocol Parse would carry it

    def parse_rest(self) -> bytes:
        """The Parse body after the statement name (pggateway.prepared keys statements by it)."""
        body = self.statement + b"\x00" + struct.pack("!h", len(self.types))
        return body + b"".join(struct.pack("!I", t) for t in self.types)


@dataclass(frozen=True, slots=True)
class Execute:
    """`EXECUTE name [(args)]`, alone or as the tail of EXPLAIN / CREATE TABLE AS."""

    name: bytes
    name_start: int
    name_end: int


@dataclass(frozen=True, slots=True)
class Deallocate:
    """`DEALLOCATE [PREPARE] name | ALL`: name b"" for ALL."""

    name: bytes


Statement = Prepare | Execute | Deallocate


def read(sql: bytes | bytearray | memoryview) -> Statement | None:
    """The one PREPARE / EXECUTE / DEALLOCATE a Query's text holds, or None."""
    text = bytes(sql)
    nul = text.find(b"\x00")
    if nul >= 0:
        text = text[:nul]
    try:
        return _read(text)
    except Unreadable:
        return None


def _read(raw: bytes) -> Statement | None:
    sql = raw.decode("latin-1")
    toks, end = tokens(sql)
    if not toks:
        return None
    first = toks[0]
    if first.kind != WORD:
        return None
    if first.text == "prepare":
        return _prepare(raw, toks, end)
    if first.text == "deallocate":
        rest = toks[1:]
        if rest and rest[0].kind == WORD and rest[0].text == "prepare":
            rest = rest[1:]
        if len(rest) != 1:
            return None
        if rest[0].kind == WORD and rest[0].text == "all":
            return Deallocate(b"")
        return Deallocate(_name(rest[0]))
    if first.text in ("execute", "explain", "create"):
        return _execute(toks)
    return None


def _prepare(raw: bytes, toks: list[Token], end: int) -> Prepare:
    if len(toks) < 4:
        raise Unreadable("too short")
    name_tok = toks[1]
    name = _name(name_tok)
    i = 2
    oids: list[int] = []
    sql_types: list[str] = []
    if toks[i].text == "(" and toks[i].kind == OTHER:
        i += 1
        while True:
            oid, spelled, i = _type(toks, i)
            oids.append(oid)
            sql_types.append(spelled)
            if i >= len(toks):
                raise Unreadable("unterminated type list")
            if toks[i].kind == OTHER and toks[i].text == ",":
                i += 1
                continue
            if toks[i].kind == OTHER and toks[i].text == ")":
                i += 1
                break
            raise Unreadable("not a type list")
    if i >= len(toks) - 1 or toks[i].kind != WORD or toks[i].text != "as":
        raise Unreadable("no AS")
    body = raw[toks[i + 1].start : end]
    type_sql = f"({', '.join(sql_types)}) " if sql_types else ""
    return Prepare(name, name_tok.start, name_tok.end, tuple(oids), type_sql, body)


def _type(toks: list[Token], i: int) -> tuple[int, str, int]:
    """One parameter type: (oid, its pg_catalog spelling, the index after it)."""
    t = toks[i] if i < len(toks) else None
    if t is None or t.kind != WORD:
        raise Unreadable("not a type name")
    w = t.text
    if w in _ZONED:
        # `timestamp[(p)] [with|without time zone]`: the precision comes before the zone.
        mods, j = _typmods(toks, i + 1)
        zone = tuple(x.text if x.kind == WORD else "" for x in toks[j : j + 3])
        zoned = w
        if zone in (("with", "time", "zone"), ("without", "time", "zone")):
            zoned = _KEYWORDS[(w, *zone)]
            j += 3
        return _finish(zoned, mods, toks, j)
    canonical: str | None = None
    j = i + 1
    if w == "pg_catalog":
        if j + 1 < len(toks) and toks[j].text == "." and toks[j + 1].kind == WORD:
            canonical = toks[j + 1].text if toks[j + 1].text in _GENERIC else None
            j += 2
    else:
        nxt = toks[j] if j < len(toks) and toks[j].kind == WORD else None
        if nxt is not None and (w, nxt.text) in _KEYWORDS:
            canonical = _KEYWORDS[(w, nxt.text)]
            j += 1
        elif (w,) in _KEYWORDS:
            canonical = _KEYWORDS[(w,)]
        elif w in _GENERIC:
            canonical = w
    if canonical is None:
        raise Unreadable("a type outside the table")
    mods, j = _typmods(toks, j)
    return _finish(canonical, mods, toks, j)


def _typmods(toks: list[Token], j: int) -> tuple[list[int], int]:
    if j >= len(toks) or toks[j].kind != OTHER or toks[j].text != "(":
        return [], j
    mods: list[int] = []
    j += 1
    while j < len(toks):
        t = toks[j]
        if t.kind != OTHER or not t.text.isdigit():
            raise Unreadable("a type modifier that is not an integer")
        mods.append(int(t.text))
        j += 1
        if j < len(toks) and toks[j].text == ",":
            j += 1
            continue
        if j < len(toks) and toks[j].text == ")":
            return mods, j + 1
        break
    raise Unreadable("a type modifier list")


def _finish(canonical: str, mods: list[int], toks: list[Token], j: int) -> tuple[int, str, int]:
    if mods:
        bounds = _TYPMODS.get(canonical)
        if bounds is None or len(mods) > len(bounds):
            raise Unreadable("a type modifier this type does not take")
        for m, (lo, hi) in zip(mods, bounds, strict=False):
            if not lo <= m <= hi:
                raise Unreadable("a type modifier out of range")
        if canonical == "numeric" and len(mods) == 2 and mods[1] > mods[0]:
            raise Unreadable("a numeric scale above its precision")
    oid, array_oid = _GENERIC[canonical]
    array = False
    while j + 1 < len(toks) and toks[j].text == "[" and toks[j].kind == OTHER:
        k = j + 1
        if toks[k].kind == OTHER and toks[k].text.isdigit():
            k += 1
        if k >= len(toks) or toks[k].text != "]":
            raise Unreadable("an array bound")
        array = True
        j = k + 1
    spelled = f"pg_catalog.{canonical}"
    if mods:
        spelled += "(" + ",".join(str(m) for m in mods) + ")"
    if array:
        spelled += "[]"
    return (array_oid if array else oid), spelled, j


def _execute(toks: list[Token]) -> Execute | None:
    """EXECUTE name [(…)]; EXPLAIN [options] EXECUTE name [(…)]; CREATE TABLE … AS EXECUTE name
    [(…)] [WITH [NO] DATA]."""
    first = toks[0].text
    k = 0
    if first != "execute":
        depth = 0
        k = -1
        for idx, t in enumerate(toks):
            if t.kind == OTHER and t.text == "(":
                depth += 1
            elif t.kind == OTHER and t.text == ")":
                depth -= 1
            elif depth == 0 and t.kind == WORD and t.text == "execute":
                k = idx
                break
        if k < 1:
            return None
        if first == "create" and toks[k - 1].text != "as":
            return None
        if (
            first == "explain"
            and not all(t.kind == WORD and t.text in ("analyze", "analyse", "verbose") for t in toks[1:k])
            and not (toks[1].text == "(" and toks[k - 1].text == ")")
        ):
            return None
    if k + 1 >= len(toks):
        return None
    name_tok = toks[k + 1]
    name = _name(name_tok)
    after = toks[k + 2 :]
    if after and not (after[0].kind == OTHER and after[0].text == "("):
        if not (first == "create" and after[0].kind == WORD and after[0].text == "with"):
            return None
    return Execute(name, name_tok.start, name_tok.end)
