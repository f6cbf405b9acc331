"""The attachment check (DESIGN §4): allowed types by name *and* content,
and a size limit on all of them together.

An attachment is every leaf part that is not body text: anything with a
file name, anything marked `Content-Disposition: attachment`, and every
non-text part (inline images referenced by `cid:` included). An attached
message (message/rfc822) is a container: its own parts are checked one by
one, and the part itself only by the name it is attached under, if any
("fwd.eml" is a file a client saves like any other). Names are read as
mail clients read them — the `filename` of Content-Disposition and the
`name` of Content-Type, RFC 2231 continuations and encoded-words decoded by
the email package, and once more the lenient way (`_lenient_names`) — and
every name must pass: the strictest wins. A name passes when its last
extension (after the trailing dots and spaces Windows ignores are gone) is
in `[policy] attachment_types`; the content passes when its magic bytes,
identified by the `filetype` package, agree with that extension (text must
be text, and markup a browser would render is not). A part without a name
passes on content alone.

The refusal says which rule refused: a name of a type not allowed gets the
allowed types; a name of an allowed type whose content is something else
gets what the content is ('"report.pdf" is a ZIP archive, not a PDF'), in
words from `KINDS`. The file name is quoted the way a reply line can carry
it (`_printable`: ASCII, no quotes, at most 60 characters).

Detached signatures (PGP, S/MIME) are removed instead of refused: the relay
rewrites the signed content, so the signature could only fail.
"""

from __future__ import annotations

import re
from email import message as legacy_message
from email import utils as email_utils
from email.header import decode_header, make_header
from email.message import EmailMessage

import filetype

from relay import replies
from relay.pipeline.lifted import LiftedPart
from relay.pipeline.message import raw_values
from relay.replies import SmtpError

# Extensions whose content is plain text: checked for being text, since
# text has no magic bytes.
TEXT_EXTENSIONS = frozenset({"txt", "csv", "log", "md"})
# Spellings that name one format.
SAME_FORMAT = {"jpeg": "jpg", "jpe": "jpg", "tiff": "tif", "htm": "html"}
# The OLE2 compound-file signature: .doc (and .xls, .ppt, .msg) start so;
# filetype recognises .doc only with more of the file present.
OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
OLE2_EXTENSIONS = frozenset({"doc", "xls", "ppt"})
SIGNATURE_TYPES = frozenset({"application/pgp-signature", "application/pkcs7-signature",
                             "application/x-pkcs7-signature"})


def _names(part: EmailMessage) -> list[str]:
    names = []
    for header, param in (("Content-Disposition", "filename"), ("Content-Type", "name")):
        value = part.get(header)
        params = getattr(value, "params", None) or {}
        name = params.get(param)
        if name:
            names.append(str(name))
        names.extend(_lenient_names(part, header, param))
    # A C string ends at NUL: "evil.exe\0.pdf" is saved as evil.exe by some
    # clients (and by the Windows file API), as evil.exe.pdf by others.
    names.extend(name.split("\x00", 1)[0] for name in list(names) if "\x00" in name)
    return list(dict.fromkeys(name for name in names if name))


def _lenient_names(part: EmailMessage, header: str, param: str) -> list[str]:
    """Every value of `param` in the raw `header`, read the lenient legacy
    way. The parser above settles ambiguity for one reading, but clients
    settle it differently: with `filename="notes.txt"; filename*=utf-8''run.js`
    it keeps the first while RFC 6266-minded clients take the `*` form; it
    stops an unquoted value at a space (`filename=a.pdf .exe`), drops
    continuations after a gap, and drops an unquoted encoded-word, where
    others read on. This reading keeps duplicates, reads to the `;`, joins
    every continuation and decodes encoded-words anywhere."""
    names = []
    for raw in raw_values(part, header):
        legacy = legacy_message.Message()
        # Unfold (RFC 5322 §2.2.3) before splitting at the semicolons.
        legacy[header] = re.sub(r"\r?\n(?=[ \t])", "", raw)
        for key, value in legacy.get_params(header=header, failobj=[]):
            if key != param:
                continue
            value = email_utils.collapse_rfc2231_value(value)
            if "=?" in value:
                try:
                    value = str(make_header(decode_header(value)))
                except (LookupError, ValueError, UnicodeError):
                    pass  # undecodable: the name as written is still checked
            names.append(value)
    return names


def _clean_name(name: str) -> str:
    # Only the last path component counts, and Windows drops trailing dots
    # and spaces ("evil.exe. " opens as evil.exe).
    name = re.split(r"[/\\]", name)[-1]
    return name.replace("\x00", "").strip().rstrip(". ")


def extension(name: str) -> str:
    name = _clean_name(name).lower()
    if "." not in name:
        return ""
    ext = name.rsplit(".", 1)[1]
    return SAME_FORMAT.get(ext, ext)


# Markup a browser sniffs as HTML or XML whatever the file is called (the
# WHATWG MIME Sniffing patterns, after leading whitespace and a UTF-8 BOM):
# such a "notes.txt" is a web page (HTML smuggling), not text.
_MARKUP = re.compile(
    rb"\A(?:\xef\xbb\xbf)?[\t\n\x0c\r ]*(?:"
    rb"(?P<html><(?:!doctype html|html|head|script|iframe|h1|div|font|table|a|style|title|b|body|br|p)[ >]|<!--)"
    rb"|(?P<xml><\?xml))", re.IGNORECASE)


def _markup(data: bytes) -> str | None:
    head = data[:1024]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        head = head.decode("utf-16", errors="ignore").encode("utf-8")
    match = _MARKUP.match(head)
    return match.lastgroup if match else None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:65536]
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True  # UTF-16 with a byte-order mark
    if b"\x00" in sample:
        return False
    controls = sum(1 for byte in sample if byte < 32 and byte not in (9, 10, 12, 13))
    return controls <= len(sample) // 100


# The most of an attachment's start that the content checks read (the text
# sample; filetype reads 8 KB, the markup sniff 1 KB).
HEAD_OCTETS = 65536


def size_and_head(part: EmailMessage) -> tuple[int, bytes]:
    """A leaf's decoded size and its first HEAD_OCTETS decoded bytes: all
    the check needs, without decoding a lifted attachment (lifted.py)."""
    if isinstance(part, LiftedPart) and part.holds_lifted():
        return part.lifted.decoded_size, part.lifted.head(HEAD_OCTETS)
    data = part.get_payload(decode=True) or b""
    return len(data), data[:HEAD_OCTETS]


def content_type_of(data: bytes) -> str | None:
    """The format the bytes are, as an extension ('pdf', 'png', …), or
    'txt' for text, or None when unknown."""
    if data.startswith(OLE2_MAGIC):
        return "doc"
    kind = filetype.guess(data)
    if kind is not None:
        return SAME_FORMAT.get(kind.extension, kind.extension)
    markup = _markup(data)
    if markup is not None:
        return markup
    if _looks_like_text(data):
        return "txt"
    return None


def content_matches(ext: str, data: bytes) -> bool:
    found = content_type_of(data)
    if ext in TEXT_EXTENSIONS:
        return found == "txt"
    if ext in OLE2_EXTENSIONS:
        return found == "doc"
    return found == ext


# What a format is called in a refusal, by the extension `content_type_of`
# gives (filetype's, or doc/html/xml/txt); anything else is "a XYZ file".
KINDS = {
    "pdf": "a PDF", "txt": "text", "csv": "text", "log": "text", "md": "text",
    "jpg": "a JPEG image", "png": "a PNG image", "gif": "a GIF image", "bmp": "a BMP image",
    "tif": "a TIFF image", "webp": "a WebP image", "heic": "a HEIC image", "ico": "an icon",
    "doc": "a Word 97-2003 document (.doc)", "xls": "an Excel 97-2003 workbook", "ppt": "a PowerPoint 97-2003 file",
    "docx": "a Word document (.docx)", "xlsx": "an Excel workbook", "pptx": "a PowerPoint presentation",
    "odt": "an OpenDocument text", "rtf": "an RTF document",
    "zip": "a ZIP archive", "rar": "a RAR archive", "7z": "a 7-Zip archive", "gz": "a gzip file",
    "bz2": "a bzip2 file", "xz": "an xz file", "tar": "a tar archive", "cab": "a cabinet archive",
    "exe": "a Windows program", "elf": "a Linux program", "dmg": "a disk image", "iso": "a disk image",
    "html": "an HTML page", "xml": "an XML document", "eml": "a mail message",
    "mp3": "an MP3 recording", "mp4": "an MP4 video", "wav": "a WAV recording",
}


def _kind(ext: str) -> str:
    return KINDS.get(ext) or f"a {ext.upper()} file"


def _content_reason(ext: str, data: bytes) -> str:
    """What the content is, against what the name says (`ext`)."""
    if not data:
        return f"is empty, not {_kind(ext)}"
    found = content_type_of(data)
    if found is None:
        return f"is not {_kind(ext)} (its content is of no known type)"
    # The OLE2 signature is the same for every Office 97-2003 format.
    what = "an Office 97-2003 file" if found == "doc" and ext not in OLE2_EXTENSIONS else _kind(found)
    return f"is {what}, not {_kind(ext)}"


def _is_attachment(part: EmailMessage) -> bool:
    if part.get_content_disposition() == "attachment" or _names(part):
        return True
    return part.get_content_maintype() not in ("text", "multipart", "message")


def _printable(name: str) -> str:
    """A file name fit to quote in a reply line: ASCII, no quotes, short."""
    name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "?" for c in name)
    return name if len(name) <= 60 else name[:57] + "..."


def check_attachments(message: EmailMessage, context, changes) -> None:
    policy = context.policy
    allowed = {SAME_FORMAT.get(t, t) for t in policy.attachment_types}
    allowed_text = ", ".join(policy.attachment_types)
    _remove_signatures(message, changes)
    total = 0
    for index, part in enumerate(message.walk()):
        container = part.is_multipart() and part.get_content_maintype() == "message"
        if container and _names(part):
            # An attached message: the walk goes on into its parts, each
            # checked on its own; here only its name, with no bytes of its
            # own to compare the name against.
            data = None
        elif part.is_multipart() or not _is_attachment(part):
            continue
        else:
            size, data = size_and_head(part)
            total += size
        names = _names(part)
        label = names[0] if names else f"unnamed {part.get_content_type()} part"
        for name in names or [None]:
            ext = extension(name) if name is not None else content_type_of(data)
            quoted = _printable(name or label)
            if ext not in allowed:
                reason = f"type {ext or 'unknown'} is not allowed"
                text = f'Attachment "{quoted}" is not allowed; allowed types: {allowed_text}'
            elif data is not None and not content_matches(ext, data):
                # The name's type is allowed: listing the types would not
                # tell the sender what is wrong; what the file really is does.
                reason = f"its content is {content_type_of(data) or 'unknown'}, not {ext}"
                text = f'Attachment "{quoted}" {_content_reason(ext, data)}'
            else:
                continue
            changes.append(f"refused: attachment {label!r} (part {index}): {reason}")
            raise SmtpError(replies.ATTACHMENT_NOT_ALLOWED.with_text(text))
    if total > policy.max_attachment_bytes:
        changes.append(f"refused: attachments total {total} bytes (limit {policy.max_attachment_bytes})")
        raise SmtpError(replies.ATTACHMENTS_TOO_BIG.with_text(
            f"Attachments total {total} bytes, over the limit of {policy.max_attachment_bytes} bytes"))


def _remove_signatures(message: EmailMessage, changes) -> None:
    for part in message.walk():
        if not part.is_multipart():
            continue
        children = part.get_payload()
        kept = [child for child in children if child.get_content_type() not in SIGNATURE_TYPES]
        if len(kept) == len(children):
            continue
        part.set_payload(kept)
        if part.get_content_subtype() == "signed":
            # What is left is not signed any more; say so honestly.
            part.set_type("multipart/mixed")
            part.del_param("protocol")
            part.del_param("micalg")
        changes.append(f"removed {len(children) - len(kept)} detached signature part(s): "
                       "the rewritten content would not verify")
