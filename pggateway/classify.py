"""Which client statements leave state behind in the backend session.

Transaction pooling hands a backend to another client as soon as it is idle, so anything that
outlives a transaction — a session setting, a temporary table, a LISTEN, a named prepared
statement, a session-level advisory lock, a cursor WITH HOLD — would leak to the next client or
vanish from under this one. A client that does any of these is *pinned*: it keeps its backend
until it disconnects. We err towards pinning (a false positive costs pooling efficiency, a false
negative costs correctness).

Open transactions are not a reason here: the relay already keeps a backend for as long as the
backend reports a transaction in progress (ReadyForQuery status 'T' or 'E').
"""

from __future__ import annotations

import re

# Pin reasons (also the `reason` label of the pinned-sessions metric).
SET = "set"
TEMP_TABLE = "temp_table"
LISTEN = "listen"
PREPARE = "prepare"
NAMED_STATEMENT = "named_statement"
ADVISORY_LOCK = "advisory_lock"
CURSOR_WITH_HOLD = "cursor_with_hold"
SET_CONFIG = "set_config"
LOAD = "load"

REASONS = (
    SET,
    TEMP_TABLE,
    LISTEN,
    PREPARE,
    NAMED_STATEMENT,
    ADVISORY_LOCK,
    CURSOR_WITH_HOLD,
    SET_CONFIG,
    LOAD,
)

# Anywhere in the text, string literals and DO bodies included (they may call these too).
# Session-level advisory locks only: the pg_advisory_xact_* family ends with the transaction.
_ADVISORY = re.compile(r"(?i)pg_(?:try_)?advisory_lock(?:_shared)?\s*\(")
_SET_CONFIG = re.compile(r"(?i)\bset_config\s*\(")
# Statements that can pin by their first word (the fast path checks only these prefixes).
_START_KEYWORDS = ("set", "reset", "listen", "prepare", "declare", "load")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def pin_reason_for_query(sql: str) -> str | None:
    """The reason a simple-protocol Query (possibly several statements) pins, or None."""
    low = sql.lower()
    # The fast path, a few substring tests: a single statement, without comments, not starting
    # with a pinning keyword and not mentioning the other triggers (`UPDATE ... SET` passes).
    if (
        "temp" not in low
        and "advisory" not in low
        and "set_config" not in low
        and "--" not in low
        and "/*" not in low
    ):
        body = low.strip().rstrip(";")
        if ";" not in body and not body.startswith(_START_KEYWORDS):
            return None
    if _ADVISORY.search(sql):
        return ADVISORY_LOCK
    if _SET_CONFIG.search(sql):
        return SET_CONFIG
    for words in split_statements(sql):
        reason = _statement_reason(words)
        if reason is not None:
            return reason
    return None


def pin_reason_for_parse(name: str, sql: str, *, named_pins: bool = True) -> str | None:
    """The reason an extended-protocol Parse pins: a named statement outlives the transaction,
    unless the gateway keeps named statements itself (`named_pins=False`, pggateway.prepared)."""
    if name and named_pins:
        return NAMED_STATEMENT
    return pin_reason_for_query(sql)


def _statement_reason(words: list[str]) -> str | None:
    if not words:
        return None
    first = words[0]
    second = words[1] if len(words) > 1 else ""
    if first == "set":
        # SET LOCAL / SET TRANSACTION / SET CONSTRAINTS end with the transaction.
        if second in ("local", "transaction", "constraints"):
            return None
        return SET
    if first == "reset":
        return SET
    if first == "create":
        if "temp" in words[1:5] or "temporary" in words[1:5]:
            return TEMP_TABLE
        return None
    if first == "listen":
        return LISTEN
    if first == "prepare":
        if second == "transaction":
            return None
        # What the prepared statement does when EXECUTEd pins now (a temporary table).
        if "as" in words:
            inner = _statement_reason(words[words.index("as") + 1 :])
            if inner is not None:
                return inner
        return PREPARE
    if first == "declare":
        for i in range(1, len(words) - 1):
            if words[i] == "with" and words[i + 1] == "hold":
                return CURSOR_WITH_HOLD
        return None
    if first == "load":
        return LOAD
    # SELECT ... INTO TEMP t, also inside WITH ... SELECT.
    for i in range(len(words) - 1):
        if words[i] == "into" and words[i + 1] in ("temp", "temporary"):
            return TEMP_TABLE
    return None


def split_statements(sql: str) -> list[list[str]]:
    """The lower-cased words of each statement, with comments removed and every string literal,
    quoted identifier body and dollar-quoted body reduced to a one-character token, so a keyword
    inside a literal never counts."""
    statements: list[list[str]] = []
    words: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == ";":
            statements.append(words)
            words = []
            i += 1
        elif c.isspace():
            i += 1
        elif c == "-" and nxt == "-":
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif c == "/" and nxt == "*":
            i = _skip_block_comment(sql, i)
        elif c == "'":
            i = _skip_string(sql, i, backslashes=False)
            words.append("'")
        elif c == '"':
            i = _skip_quoted(sql, i, '"')
            words.append('"')
        elif c == "$" and (m := _DOLLAR_TAG.match(sql, i)) is not None:
            tag = m.group(0)
            end = sql.find(tag, m.end())
            i = n if end < 0 else end + len(tag)
            words.append("$")
        elif c.isalpha() or c == "_":
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "_$"):
                j += 1
            word = sql[i:j].lower()
            if word == "e" and j < n and sql[j] == "'":
                j = _skip_string(sql, j, backslashes=True)
                word = "'"
            words.append(word)
            i = j
        else:
            words.append(c)
            i += 1
    if words:
        statements.append(words)
    return statements


def _skip_block_comment(sql: str, i: int) -> int:
    """Past a /* ... */ comment; PostgreSQL's block comments nest."""
    depth, i, n = 0, i, len(sql)
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
    return n


def _skip_string(sql: str, i: int, *, backslashes: bool) -> int:
    """Past a '...' literal starting at i ('' is a quote; in E'' a backslash escapes)."""
    j, n = i + 1, len(sql)
    while j < n:
        c = sql[j]
        if backslashes and c == "\\":
            j += 2
            continue
        if c == "'":
            if j + 1 < n and sql[j + 1] == "'":
                j += 2
                continue
            return j + 1
        j += 1
    return n


def _skip_quoted(sql: str, i: int, quote: str) -> int:
    j, n = i + 1, len(sql)
    while j < n:
        if sql[j] == quote:
            if j + 1 < n and sql[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    return n
