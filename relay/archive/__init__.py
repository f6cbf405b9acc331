"""The dispute tools' logic, apart from any database, one module per purpose:

* chain.py — how an archive row is hashed and linked, and the verifier;
* headers.py — auto-reply detection and what the rewrite changed;
* times.py — the store's timestamp text and an operator's dates;
* retention.py — the retention cutoff and the purge summary line;
* export.py — the mbox / eml-dir exporter;
* report.py — the response-time report (JSON, text), chart.py its HTML/SVG.

Everything here works on plain values (rows as dicts, datetimes, bytes), so
the CLI, `relay serve` and the tests call it the same way. The store
(relay/store/) reads and writes the rows and imports chain.py to hash them;
nothing in this package imports the store, so the two never import each
other. The names below are the package's API (`from relay import archive`).
"""

from relay.archive.chain import (
    GENESIS_HASH,
    ChainBreak,
    ChainVerifier,
    chain_hash,
    content_problem,
    explain_link_break,
    row_metadata,
    sha256_hex,
)
from relay.archive.chart import render_html, svg_chart
from relay.archive.export import (
    AS_CHOICES,
    FORMATS,
    Exporter,
    ExportError,
    mbox_entry,
    mbox_unquote,
    write_atomically,
)
from relay.archive.headers import header_block, header_changes, header_lines, is_auto_reply
from relay.archive.report import (
    ANSWER_WITHIN,
    BUCKETS,
    MessageFact,
    SellerResponse,
    Waiting,
    all_sellers,
    bucket_index,
    format_duration,
    format_share,
    natural_key,
    percentile,
    readable,
    render_text,
    report_json,
    response_times,
)
from relay.archive.retention import format_bytes, purge_summary, retention_cutoff
from relay.archive.times import iso, parse_iso, parse_when, utc_now

__all__ = [
    "ANSWER_WITHIN", "AS_CHOICES", "BUCKETS", "FORMATS", "GENESIS_HASH", "ChainBreak", "ChainVerifier",
    "ExportError", "Exporter", "MessageFact", "SellerResponse", "Waiting", "all_sellers", "bucket_index",
    "chain_hash", "content_problem", "explain_link_break", "format_bytes", "format_duration", "format_share",
    "header_block", "header_changes", "header_lines", "is_auto_reply", "iso", "mbox_entry", "mbox_unquote",
    "natural_key", "parse_iso", "parse_when", "percentile", "purge_summary", "readable", "render_html",
    "render_text", "report_json", "response_times", "retention_cutoff", "row_metadata", "sha256_hex",
    "svg_chart", "utc_now", "write_atomically",
]
