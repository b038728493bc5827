"""Which ClickHouse failures are worth retrying.

Bad data (the rows themselves are unacceptable) is never fixed by waiting; anything else (server
down, network, too many parts, timeouts) is retried with back-off while the stream stops consuming.
"""

from __future__ import annotations

import re

# ClickHouse error codes that mean "this input is wrong", whatever the server state.
BAD_DATA_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    26,   # CANNOT_PARSE_QUOTED_STRING
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
})

_CODE = re.compile(r"Code:\s*(\d+)")


class ClickHouseUnavailable(RuntimeError):
    """ClickHouse could not be reached; the message says where we tried."""


class ClickHouseBusy(ClickHouseUnavailable):
    """The embedded ClickHouse's directory is held by another process (a worker, or a command that opened
    it for a moment): worth waiting for, unlike a broken directory."""


def error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = _CODE.search(str(exc))
    return int(match.group(1)) if match else None


def is_bad_data(exc: BaseException) -> bool:
    return error_code(exc) in BAD_DATA_CODES
