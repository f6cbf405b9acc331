"""The record of what the pipeline did to one message.

A list of sentences (archived with the message, for the arbiter) plus a
tally of removals by kind, from which the `X-Relay-Policy:` header and the
log line are made. Stages only append; nothing here decides anything.
"""

from __future__ import annotations

from collections import Counter

_NOUNS = {"links": "link(s)", "emails": "email address(es)", "phones": "phone number(s)",
          "tags": "HTML element(s)", "attributes": "HTML attribute(s)", "comments": "HTML comment(s)",
          "images": "image(s)"}


class ChangeLog(list):
    """A list of change descriptions with a tally of what was removed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.tally: Counter = Counter()
        self.dropped_tags: Counter = Counter()

    def record(self, removed: Counter, where: str) -> None:
        """Add the removals `removed` ({kind: count}) made in `where`."""
        removed = +removed  # drop zero counts
        if not removed:
            return
        self.tally.update(removed)
        what = ", ".join(f"{count} {_NOUNS.get(kind, kind)}" for kind, count in sorted(removed.items()))
        self.append(f"removed {what} from {where}")

    def merge(self, other: "ChangeLog") -> None:
        """Take in what another log (a worker process's) recorded."""
        self.extend(other)
        self.tally.update(other.tally)
        self.dropped_tags.update(other.dropped_tags)

    def policy_summary(self) -> str:
        """The value of X-Relay-Policy: what the content rules removed."""
        removed = +self.tally
        if not removed:
            return "clean"
        return "; ".join(f"{kind}-removed={count}" for kind, count in sorted(removed.items()))
