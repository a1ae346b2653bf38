"""How a result that was not computed is reported: never by leaving its keys out without a word.

A skip logs a warning that says what was skipped and why, and adds a key with a `skipped` component and
value 1 to the metrics, so `metrics.json` itself records the gap (docs/evaluation.md, "Skipped results"):
an evaluator returns `{"skipped": 1}` (-> `<evaluator>/skipped`) when it did not run at all, or
`{"skipped/<metric>": 1}` (-> `<evaluator>/skipped/<metric>`) for a part of its output; outside an
evaluator the key is `skipped/<metric>`."""

from __future__ import annotations

import logging

log = logging.getLogger("aeforge")


def skipped(who: str, why: str, what: str | None = None) -> dict[str, float]:
    """Warn that `who` skipped `what` (all of its output when None) because `why`; the metrics to add."""
    key = "skipped" if what is None else f"skipped/{what}"
    log.warning("%s: %s skipped (%s); metrics record it as %s: 1", who, what or "evaluation", why, key)
    return {key: 1.0}
