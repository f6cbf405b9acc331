"""Configuration: the embedded defaults with one TOML file laid over them.

`load()` is the only code in relay that reads the config file or the
environment. It returns frozen dataclasses, validated once: an unknown key,
a value of the wrong type or a malformed address/URL raises `ConfigError`
whose text names the key (``inbound.listen: …``), so start-up can fail with
one clear line. Relative paths are kept as written and so resolve against the
working directory of the process.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = Path("config/relay.toml")
ENV_VAR = "RELAY_CONFIG"

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class ConfigError(Exception):
    """A config file that cannot be used; the text names the offending key."""


@dataclass(frozen=True)
class Endpoint:
    """A listen address. Port 0 asks the OS for a free port (tests use it)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class UpstreamTarget:
    """Where finished mail goes: an SMTP server or a directory of .eml files."""

    scheme: str  # "smtp", "smtp+starttls", "smtps" or "maildir"
    host: str = ""
    port: int = 0
    username: str = ""
    password: str = field(default="", repr=False)
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "maildir":
            return f"maildir:{self.path}"
        if self.scheme == "mx":
            return "mx:"
        auth = f"{self.username}:***@" if self.username else ""
        return f"{self.scheme}://{auth}{self.host}:{self.port}"


@dataclass(frozen=True)
class InboundConfig:
    listen: Endpoint = Endpoint("127.0.0.1", 2525)
    hostname: str = ""
    max_message_bytes: int = 0  # 0: derived from the attachment limit (Config.size_limit)
    processing_timeout: float = 60.0
    max_received: int = 50  # more Received: headers than this → 554 5.4.6
    # Clients allowed to send postfix's XFORWARD (the real client's address
    # and HELO, for SPF when postfix is in front); no one else.
    xforward_hosts: tuple[str, ...] = ("127.0.0.1", "::1")
    max_relay_hops: int = 3  # more of the relay's own Received: lines than this → 554 5.4.6
    # A DATA line ending in a bare LF: "normal" reads it as CRLF (postfix's
    # smtpd_forbid_bare_newline = normal), "reject" refuses it 550 5.6.11.
    # Both refuse a bare CR and the fake ends of SMTP smuggling. All listeners.
    bare_newline: str = "normal"


@dataclass(frozen=True)
class SubmissionConfig:
    listen: Endpoint | None = Endpoint("127.0.0.1", 5870)  # STARTTLS (the 587 role); "" → off
    listen_tls: Endpoint | None = Endpoint("127.0.0.1", 4650)  # implicit TLS (the 465 role); "" → off
    tls_cert: str = ""
    tls_key: str = ""
    # Failed AUTH: the reply to the n-th failure in a row (per account and
    # per client IP) waits failure_delay × 2^(n-1) seconds, at most
    # max_failure_delay; after max_failures in failure_window seconds the
    # client IP gets 421 4.7.0 at once and is disconnected until the window
    # has passed. A right password is accepted whenever it is tried.
    failure_delay: float = 0.5
    max_failure_delay: float = 16.0
    max_failures: int = 10
    failure_window: float = 900.0


@dataclass(frozen=True)
class UpstreamConfig:
    url: UpstreamTarget = UpstreamTarget("maildir", path="var/outbox")
    timeout: float = 30.0
    ca_file: str = ""
    # A smarthost connection carries up to this many messages (0: one
    # connection per message) and waits this long idle for the next one;
    # postfix's smtp_connection_cache_time_limit is 2 s as well.
    reuse_count: int = 100
    reuse_idle_seconds: float = 2.0


# HTML that mail clients render and that carries no script: layout tables,
# inline formatting, lists, headings, images and links.
DEFAULT_HTML_TAGS = (
    "a", "abbr", "b", "big", "blockquote", "br", "caption", "center", "cite", "code", "col",
    "colgroup", "dd", "del", "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "i", "img", "ins", "kbd", "li", "ol", "p", "pre", "q", "s", "small", "span", "strike",
    "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u", "ul",
)
DEFAULT_HTML_ATTRIBUTES = (
    ("*", ("align", "valign", "dir", "lang", "title", "style", "class", "width", "height", "bgcolor")),
    ("a", ("href", "name", "target")),
    ("img", ("src", "alt", "border", "hspace", "vspace")),
    ("font", ("color", "face", "size")),
    ("table", ("border", "cellpadding", "cellspacing", "background")),
    ("td", ("colspan", "rowspan", "nowrap", "background")),
    ("th", ("colspan", "rowspan", "nowrap", "background", "scope")),
    ("ol", ("start", "type")),
    ("ul", ("type",)),
    ("li", ("value",)),
    ("col", ("span",)),
    ("colgroup", ("span",)),
    ("hr", ("size", "noshade")),
    ("blockquote", ("cite",)),
    ("q", ("cite",)),
    ("del", ("cite", "datetime")),
    ("ins", ("cite", "datetime")),
)
# bleach's CSS allowlist plus the box properties mail layouts rely on; no
# property that takes a url() (background, list-style-image, content…).
DEFAULT_CSS_PROPERTIES = (
    "background-color", "border", "border-bottom", "border-bottom-color", "border-collapse",
    "border-color", "border-left", "border-left-color", "border-radius", "border-right",
    "border-right-color", "border-spacing", "border-style", "border-top", "border-top-color",
    "border-width", "clear", "color", "direction", "display", "float", "font", "font-family",
    "font-size", "font-style", "font-variant", "font-weight", "height", "letter-spacing",
    "line-height", "margin", "margin-bottom", "margin-left", "margin-right", "margin-top",
    "max-width", "min-width", "padding", "padding-bottom", "padding-left", "padding-right",
    "padding-top", "table-layout", "text-align", "text-decoration", "text-indent",
    "text-transform", "vertical-align", "white-space", "width", "word-break",
)


@dataclass(frozen=True)
class PolicyConfig:
    allowed_link_domains: tuple[str, ...] = ("marketplace.example",)
    attachment_types: tuple[str, ...] = ("pdf", "txt", "jpg", "jpeg", "png", "gif", "doc", "docx")
    max_attachment_bytes: int = 10485760
    max_text_part_bytes: int = 2097152
    html_tags: tuple[str, ...] = DEFAULT_HTML_TAGS
    html_attributes: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_HTML_ATTRIBUTES
    html_css_properties: tuple[str, ...] = DEFAULT_CSS_PROPERTIES
    redact_phone_numbers: bool = False
    phone_regions: tuple[str, ...] = ("us",)
    # Daily cap: a seller sends at most base + per_order × ceil(orders in the
    # last order_window_days / order_window_days) messages per window_hours.
    daily_message_base: int = 600
    daily_message_per_order: int = 5
    daily_window_hours: int = 24
    order_window_days: int = 7
    # A seller may start a conversation only within this many days of the
    # relationship's latest order (0: no limit); replies are not limited.
    proactive_window_days: int = 30

    def attribute_map(self) -> dict[str, list[str]]:
        return {tag: list(names) for tag, names in self.html_attributes}


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()  # "host" or "host:port"; empty → the system's


@dataclass(frozen=True)
class AuthConfig:
    inbound: str = "dmarc"  # dmarc | strict | off: SPF/DKIM/DMARC policy for the inbound listener


@dataclass(frozen=True)
class DkimConfig:
    selector: str = "relay"
    key_file: str = ""  # PEM RSA key; empty → made as var/dkim/<selector>.pem at first start


@dataclass(frozen=True)
class BounceConfig:
    lifetime_days: int = 7  # how long a VERP bounce address stays valid
    secret_file: str = ""  # HMAC key; empty → made as var/bounce.key at first start


@dataclass(frozen=True)
class ArchiveConfig:
    retention_days: int = 730


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may take of a listener (issue 8). Each limit answers
    with a reply and, where the session cannot go on, closes it."""

    max_connections: int = 500  # open on all listeners together → 421 4.3.2
    # From one client address → 421 4.7.0. Addresses in [inbound]
    # xforward_hosts (postfix in front, which fans its queue out over many
    # connections) are exempt.
    max_connections_per_ip: int = 20
    max_recipients: int = 100  # RCPT commands in one transaction; more → 452 4.5.3
    command_call_limit: int = 1000  # times one command may be sent in a session → 421 4.7.0
    idle_timeout: float = 300.0  # seconds waiting for the next line → 421 4.4.2
    data_timeout: float = 600.0  # seconds for one DATA transfer → 421 4.4.2
    session_timeout: float = 3600.0  # seconds for one connection → 421 4.4.2
    # Clients that must begin with a PROXY protocol header (HAProxy v1 or
    # v2), whose source address then stands for the client's. Anyone else
    # sending "PROXY" gets an unknown-command reply.
    proxy_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkersConfig:
    """The processes that parse, rewrite and sanitize messages."""

    count: int = 0  # 0 → one per CPU core the relay may run on
    time_limit: float = 30.0  # seconds one message may take in a worker → 554 5.6.0
    memory_limit_mb: int = 1024  # address space of one worker → 554 5.6.0 when a message needs more
    # Seconds a worker beyond the first may stay without a message before it
    # exits (postfix's max_idle); more are started while messages wait, up
    # to `count`. 0 → all `count` workers run all the time.
    max_idle: float = 100.0

    @property
    def processes(self) -> int:
        # The cores this process may use (taskset, a container's cpuset), not
        # the machine's: a relay pinned to one core gains nothing from two.
        return self.count or len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class MetricsConfig:
    listen: Endpoint | None = None  # host:port for /metrics and /healthz; "" → off


@dataclass(frozen=True)
class ApiConfig:
    # host:port of the HTTP API (relay/api.py, docs/api.md); "" → off.
    # Tokens authenticate every call; keep it on loopback or behind TLS.
    listen: Endpoint | None = None


WEBHOOK_EVENTS = ("message.delivered", "message.refused", "message.bounced")


@dataclass(frozen=True)
class WebhooksConfig:
    """Events POSTed to the marketplace (relay/webhooks.py, docs/webhooks.md)."""

    url: str = ""  # http(s)://… the relay POSTs each event to; "" → off
    secret_file: str = ""  # the HMAC-SHA256 key; empty → made as var/webhook.key at first start
    events: tuple[str, ...] = WEBHOOK_EVENTS  # which of them to send
    timeout: float = 10.0  # seconds for one POST, connecting included
    # Seconds before the first retry of a failed POST; each further retry
    # waits twice as long, up to `max_retry_seconds`.
    retry_seconds: float = 30.0
    max_retry_seconds: float = 3600.0
    max_age_hours: int = 72  # an event not sent by then is given up (and logged)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    domain: str = "marketplace.example"
    database: str = "var/relay.sqlite3"
    inbound: InboundConfig = InboundConfig()
    submission: SubmissionConfig = SubmissionConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    policy: PolicyConfig = PolicyConfig()
    archive: ArchiveConfig = ArchiveConfig()
    dns: DnsConfig = DnsConfig()
    auth: AuthConfig = AuthConfig()
    dkim: DkimConfig = DkimConfig()
    bounce: BounceConfig = BounceConfig()
    metrics: MetricsConfig = MetricsConfig()
    api: ApiConfig = ApiConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    log: LogConfig = LogConfig()
    limits: LimitsConfig = LimitsConfig()
    workers: WorkersConfig = WorkersConfig()

    @property
    def greeting_hostname(self) -> str:
        return self.inbound.hostname or self.domain

    @property
    def state_dir(self) -> Path:
        """Where generated keys live: the database's folder (var/ by default)."""
        return Path(self.database).parent

    @property
    def size_limit(self) -> int:
        """The SIZE the listener advertises and enforces. Derived, unless set,
        so that a message whose attachments are over the limit is refused
        at MAIL FROM (when the client declares SIZE) or while DATA is read:
        base64 grows data by 4/3 and its CRLF every 76 characters by 78/76,
        plus room for the text parts and headers."""
        if self.inbound.max_message_bytes:
            return self.inbound.max_message_bytes
        encoded = self.policy.max_attachment_bytes * 4 // 3 * 78 // 76
        return encoded + 2 * self.policy.max_text_part_bytes + 1048576


def config_path(cli_value: str | None, environ: typing.Mapping[str, str] = os.environ) -> Path:
    """`--config`, else $RELAY_CONFIG, else config/relay.toml."""
    if cli_value:
        return Path(cli_value)
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR])
    return DEFAULT_PATH


def load(path: Path) -> Config:
    """Read and validate the TOML file at `path`."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}") from None
    return from_mapping(data)


def from_mapping(data: typing.Mapping[str, typing.Any]) -> Config:
    """Lay `data` (parsed TOML) over the defaults and validate the result."""
    return _build(Config, data, prefix="")


# --- validation -------------------------------------------------------------

def _build(cls: type, data: typing.Mapping[str, typing.Any], prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        raw = data[f.name]
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and kind not in (Endpoint, UpstreamTarget):
            if not isinstance(raw, dict):
                raise ConfigError(f"{key}: expected a table [{key}], got {_describe(raw)}")
            values[f.name] = _build(kind, raw, prefix=f"{key}.")
        else:
            values[f.name] = _convert(key, kind, raw)
    built = cls(**values)
    _check(built, prefix)
    return built


def _check_database_url(config: "Config") -> None:
    """`database` is a URL: PostgreSQL, for one or several relay nodes. The
    files a node makes beside a SQLite database (bounce key, DKIM key,
    submission certificate) have no folder to go in, and every node must
    use the same ones: they must be configured."""
    from relay.store.url import SCHEMES, postgres_options, scheme_of

    scheme = scheme_of(config.database)
    if scheme not in SCHEMES:
        raise ConfigError(f"database: {scheme}:// is not supported; give a SQLite file path "
                          "or a postgresql:// URL")
    try:
        postgres_options(config.database)
    except ValueError as exc:
        raise ConfigError(f"database: {exc}") from None
    missing = []
    if not config.bounce.secret_file:
        missing.append("[bounce] secret_file")
    if not config.dkim.key_file:
        missing.append("[dkim] key_file")
    if config.webhooks.url and not config.webhooks.secret_file:
        missing.append("[webhooks] secret_file")
    submission = config.submission
    if (submission.listen is not None or submission.listen_tls is not None) and not submission.tls_cert:
        missing.append("[submission] tls_cert and tls_key")
    if missing:
        raise ConfigError(f"database: with PostgreSQL, set {', '.join(missing)}: every relay node must use "
                          "the same files, and nothing is made beside the database")


def _convert(key: str, kind, raw):
    if kind is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(raw)}")
        return raw
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(raw)}")
        if raw < 0:
            raise ConfigError(f"{key}: must not be negative, got {raw}")
        return raw
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(raw)}")
        if raw <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {raw}")
        return float(raw)
    if kind is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(raw)}")
        return raw
    if kind == tuple[tuple[str, tuple[str, ...]], ...]:
        if not isinstance(raw, dict) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in raw.values()):
            raise ConfigError(f"{key}: expected a table of lists of strings, as in {{ a = [\"href\"] }}, "
                              f"got {_describe(raw)}")
        return tuple((tag.strip().lower(), tuple(x.strip().lower() for x in names))
                     for tag, names in raw.items())
    if kind == tuple[str, ...]:
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{key}: expected a list of strings, got {_describe(raw)}")
        return tuple(x.strip().lower() for x in raw)
    if kind is Endpoint:
        return parse_endpoint(key, raw)
    if kind == Endpoint | None:
        if raw == "":
            return None
        return parse_endpoint(key, raw)
    if kind is UpstreamTarget:
        return parse_upstream_url(key, raw)
    raise AssertionError(f"no converter for {key}: {kind}")  # a bug in this module


def _check(section, prefix: str) -> None:
    """Cross-field and value checks that the type alone does not express."""
    if isinstance(section, Config):
        domain = section.domain.strip().lower()
        if domain != section.domain or not _HOSTNAME_RE.match(domain) or "." not in domain:
            raise ConfigError(f"domain: expected a lower-case domain name, got {section.domain!r}")
        if not section.database:
            raise ConfigError("database: must not be empty")
        if "://" in section.database:
            _check_database_url(section)
    elif isinstance(section, InboundConfig):
        if section.hostname and not _HOSTNAME_RE.match(section.hostname.lower()):
            raise ConfigError(f"{prefix}hostname: not a host name: {section.hostname!r}")
        if 0 < section.max_message_bytes < 1024:
            raise ConfigError(f"{prefix}max_message_bytes: must be 0 (derived) or at least 1024")
        for host in section.xforward_hosts:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"{prefix}xforward_hosts: not an IP address: {host!r}") from None
        if section.bare_newline not in ("normal", "reject"):
            raise ConfigError(f"{prefix}bare_newline: expected one of normal, reject, got {section.bare_newline!r}")
        if section.max_received < 1 or section.max_relay_hops < 1:
            raise ConfigError(f"{prefix}max_received, {prefix}max_relay_hops: must be at least 1")
    elif isinstance(section, WebhooksConfig):
        if section.url:
            parts = urllib.parse.urlsplit(section.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{prefix}url: expected an http:// or https:// URL, got {section.url!r}")
        for event in section.events:
            if event not in WEBHOOK_EVENTS:
                raise ConfigError(f"{prefix}events: expected some of {', '.join(WEBHOOK_EVENTS)}, got {event!r}")
        if section.max_retry_seconds < section.retry_seconds:
            raise ConfigError(f"{prefix}max_retry_seconds: must be at least retry_seconds")
        if section.max_age_hours < 1:
            raise ConfigError(f"{prefix}max_age_hours: must be at least 1")
    elif isinstance(section, PolicyConfig):
        for domain in section.allowed_link_domains:
            if not _HOSTNAME_RE.match(domain):
                raise ConfigError(f"{prefix}allowed_link_domains: not a domain name: {domain!r}")
        for region in section.phone_regions:
            if not re.fullmatch(r"[a-z]{2}", region):
                raise ConfigError(f"{prefix}phone_regions: expected two-letter region codes, got {region!r}")
        for name in section.attachment_types:
            if not re.fullmatch(r"[a-z0-9]{1,10}", name):
                raise ConfigError(f"{prefix}attachment_types: expected file extensions without a dot, got {name!r}")
        if section.max_attachment_bytes < 1:
            raise ConfigError(f"{prefix}max_attachment_bytes: must be at least 1")
        if section.max_text_part_bytes < 1024:
            raise ConfigError(f"{prefix}max_text_part_bytes: must be at least 1024")
        for name in ("daily_window_hours", "order_window_days"):
            if getattr(section, name) < 1:
                raise ConfigError(f"{prefix}{name}: must be at least 1")
    elif isinstance(section, SubmissionConfig):
        if bool(section.tls_cert) != bool(section.tls_key):
            raise ConfigError(f"{prefix}tls_cert, {prefix}tls_key: give both, or neither for a self-signed pair")
        if section.max_failures < 1:
            raise ConfigError(f"{prefix}max_failures: must be at least 1")
    elif isinstance(section, DnsConfig):
        from relay.dns import parse_nameserver

        for entry in section.nameservers:
            try:
                parse_nameserver(entry)
            except ValueError:
                raise ConfigError(f"{prefix}nameservers: expected \"host\" or \"host:port\", got {entry!r}") from None
    elif isinstance(section, AuthConfig):
        if section.inbound not in ("dmarc", "strict", "off"):
            raise ConfigError(f"{prefix}inbound: expected one of dmarc, strict, off, got {section.inbound!r}")
    elif isinstance(section, DkimConfig):
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", section.selector):
            raise ConfigError(f"{prefix}selector: not a DNS label: {section.selector!r}")
    elif isinstance(section, BounceConfig):
        if section.lifetime_days < 1:
            raise ConfigError(f"{prefix}lifetime_days: must be at least 1")
    elif isinstance(section, ArchiveConfig):
        if section.retention_days < 1:
            raise ConfigError(f"{prefix}retention_days: must be at least 1")
    elif isinstance(section, LimitsConfig):
        for name in ("max_connections", "max_connections_per_ip", "max_recipients", "command_call_limit"):
            if getattr(section, name) < 1:
                raise ConfigError(f"{prefix}{name}: must be at least 1")
        for host in section.proxy_hosts:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"{prefix}proxy_hosts: not an IP address: {host!r}") from None
    elif isinstance(section, WorkersConfig):
        if section.memory_limit_mb and section.memory_limit_mb < 64:
            # Python and the pipeline's libraries alone take about 45 MB.
            raise ConfigError(f"{prefix}memory_limit_mb: must be 0 (no limit) or at least 64")
        if section.max_idle < 0:
            raise ConfigError(f"{prefix}max_idle: must be 0 (keep every worker) or more seconds")
    elif isinstance(section, LogConfig):
        if section.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"{prefix}level: expected one of debug, info, warning, error, got {section.level!r}"
            )


def parse_endpoint(key: str, raw) -> Endpoint:
    """'host:port' or '[v6]:port'."""
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: expected \"host:port\", got {_describe(raw)}")
    host, sep, port_text = raw.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{key}: expected \"host:port\", got {raw!r}")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"{key}: port {port} is out of range")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host.lower()):
            raise ConfigError(f"{key}: not an IP address or host name: {host!r}") from None
    return Endpoint(host, port)


_DEFAULT_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


def parse_upstream_url(key: str, raw) -> UpstreamTarget:
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: expected a URL string, got {_describe(raw)}")
    if raw.startswith("maildir:"):
        path = raw[len("maildir:"):]
        if not path:
            raise ConfigError(f"{key}: maildir: needs a directory, as in maildir:var/outbox")
        return UpstreamTarget("maildir", path=path)
    parts = urllib.parse.urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme == "mx":
        if parts.netloc or parts.path:
            raise ConfigError(f"{key}: mx: takes nothing after the colon")
        return UpstreamTarget("mx")
    if scheme not in _DEFAULT_PORTS:
        raise ConfigError(
            f"{key}: unsupported URL {raw!r}; expected smtp://, smtp+starttls://, smtps://, mx: or maildir:"
        )
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise ConfigError(f"{key}: bad port in {_redact(raw)!r}") from None
    host = parts.hostname or ""
    if not host:
        raise ConfigError(f"{key}: missing host in {_redact(raw)!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{key}: unexpected path or query in {_redact(raw)!r}")
    username = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    if username and scheme == "smtp":
        raise ConfigError(f"{key}: credentials need TLS; use smtp+starttls:// or smtps://")
    return UpstreamTarget(scheme, host=host, port=port, username=username, password=password)


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def _describe(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def effective(config: Config) -> dict:
    """The settings as plain data for `relay check-config` (secrets masked)."""
    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, (Endpoint, UpstreamTarget)):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (Endpoint, UpstreamTarget)):
            return str(value)
        if value is None:
            return ""
        if isinstance(value, tuple) and value and all(
                isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], tuple) for v in value):
            return {k: list(v) for k, v in value}
        if isinstance(value, tuple):
            return list(value)
        return value
    settings = plain(config)
    settings["inbound"]["effective_size_limit"] = config.size_limit
    from relay.store.url import redact

    settings["database"] = redact(config.database)
    settings["webhooks"]["url"] = redact(config.webhooks.url)
    return settings
