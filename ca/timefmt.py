"""Times and durations: defined in `common/timefmt.py` (shared with the gateway)."""
from common.timefmt import (  # noqa: F401 (re-exported)
    Clock,
    format_duration,
    from_rfc3339,
    parse_duration,
    to_rfc3339,
    utc_now,
)
