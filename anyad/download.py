"""``anyad pull``: fetch a GGUF file safely.

The bytes go to ``.<name>.part`` beside the destination, hashed as they arrive; an
interrupted download resumes from there with an HTTP range request; the file is renamed
into place only when it is complete and its SHA-256 matches (``--sha256``, else the hash
the Hugging Face hub publishes for the file, when it does). ``hf:ORG/REPO/FILE.gguf``
means the hub's download URL for that file (``$HF_ENDPOINT`` as huggingface_hub reads it).

``fetch`` is that machinery for any one file (the Ollama door's registry blobs use it too);
``pull`` is ``fetch`` for a GGUF file named by its URL.

Redirects are followed by ``fetch`` itself, at most ``MAX_REDIRECTS`` of them: to an
``https://`` URL anywhere, or to the first URL's own host (its scheme and port as they
come); never to a loopback, private, link-local or otherwise non-public address unless the
first host is one itself (a registry on loopback may send its blobs to another port of
loopback, a public one may not send anyad into the local network). A name is held to that
by the addresses it resolves to, as the connection is made. The request's own headers go
only to the first host.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import unquote, urlparse

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from anyad import __version__
from anyad.tables import size as _size

HF_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")
GGUF_MAGIC = b"GGUF"
# Unicode's control, format (e.g. right-to-left override) and line/paragraph separators:
# none belongs in a file name a person reads in a listing.
UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp"})
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


class DownloadError(Exception):
    """A download that cannot finish; the message says why and what to do."""


class RedirectRefused(OSError):
    """A redirect (or the address its host resolves to) that ``fetch`` does not follow."""


def non_public(host: str) -> bool:
    """Whether an IP address is loopback, private, link-local or otherwise not on the
    public internet (False for a name: see ``_Guard``)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


class _Guard(AbstractResolver):
    """aiohttp's resolver, holding every host but the first one to public addresses, unless
    the first one is not public itself (learnt as it is resolved: it is connected to first)."""

    def __init__(self, origin: URL) -> None:
        self.inner = DefaultResolver()
        self.origin = (origin.host or "").lower()
        self.local_ok = non_public(self.origin)

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        private = any(non_public(r["host"]) for r in found)
        if host.lower().rstrip(".") == self.origin.rstrip("."):
            self.local_ok = self.local_ok or private
        elif private and not self.local_ok:
            raise RedirectRefused(f"the download was redirected to {host}, which resolves to a loopback or private "
                                  "address; anyad follows redirects into the local network only from a server on it")
        return found

    async def close(self) -> None:
        await self.inner.close()


def _same_host(a: URL, b: URL) -> bool:
    return (a.host or "").lower() == (b.host or "").lower() and a.port == b.port


def _follow(current: URL, location: str, origin: URL, guard: _Guard) -> URL:
    """The URL a redirect leads to, if ``fetch`` follows it (else RedirectRefused)."""
    try:
        nxt = current.join(URL(location))
    except ValueError:
        raise RedirectRefused("the server redirected the download to a URL that is not valid") from None
    if nxt.scheme not in ("http", "https") or not nxt.host:
        raise RedirectRefused(f"the server redirected the download to a {nxt.scheme or 'relative'}: URL; anyad "
                              "follows http(s) redirects only")
    same = _same_host(nxt, origin)
    if nxt.scheme != "https" and not same:
        raise RedirectRefused(f"the server redirected the download to http://{nxt.host}; anyad follows redirects "
                              "only to https:// URLs or to the same host")
    if not same and _is_ip(nxt.host) and non_public(nxt.host) and not guard.local_ok:
        raise RedirectRefused(f"the server redirected the download to {nxt.host}, a loopback or private address; "
                              "anyad follows redirects into the local network only from a server on it")
    return nxt


async def _get(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               guard: _Guard) -> tuple[aiohttp.ClientResponse, list[Mapping[str, str]]]:
    """GET ``url``, following redirects as ``fetch`` allows; the answer, and each redirect's headers."""
    origin = current = URL(url)
    hops: list[Mapping[str, str]] = []
    for _ in range(MAX_REDIRECTS + 1):
        sent = headers if _same_host(current, origin) else \
            {k: v for k, v in headers.items() if k in ("User-Agent", "Range")}
        resp = await session.get(current, headers=sent, allow_redirects=False)
        if resp.status not in REDIRECTS:
            return resp, hops
        location = resp.headers.get("Location")
        hops.append(resp.headers.copy())
        resp.release()
        if not location:
            raise RedirectRefused(f"the server answered {resp.status} with no Location to go to")
        current = _follow(current, location, origin, guard)
    raise RedirectRefused(f"more than {MAX_REDIRECTS} redirects")


def _refused(exc: BaseException) -> RedirectRefused | None:
    """The RedirectRefused inside an aiohttp connection error, if that is what it is."""
    if isinstance(exc, RedirectRefused):
        return exc
    inner = getattr(exc, "os_error", None)
    return inner if isinstance(inner, RedirectRefused) else None


@dataclass(slots=True)
class Progress:
    name: str
    total: int | None
    done: int
    started_at: float
    resumed_from: int


def resolve_source(source: str, revision: str = "main") -> str:
    """A URL for ``source``: itself, or the hub's download URL for ``hf:ORG/REPO/PATH``."""
    if source.startswith("hf:"):
        parts = source[3:].strip("/").split("/")
        if len(parts) < 3 or not all(parts):
            raise DownloadError(f"{source!r}: expected hf:ORG/REPO/FILE.gguf")
        endpoint = (os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
        return f"{endpoint}/{parts[0]}/{parts[1]}/resolve/{revision}/{'/'.join(parts[2:])}"
    if not re.match(r"^https?://[^/\s]+/", source):
        raise DownloadError(f"{source!r}: expected an http(s):// URL or hf:ORG/REPO/FILE.gguf")
    return source


def file_name(url: str) -> str:
    """The decoded last segment of ``url``'s path, if it is a plain file name."""
    # The segment is taken before decoding, so %2F and the like are still inside it: check after.
    encoded = urlparse(url).path.rsplit("/", 1)[-1]
    if not encoded:
        raise DownloadError(f"{url}: the URL does not end in a file name")
    return plain_name(unquote(encoded))


def plain_name(name: str) -> str:
    """``name``, if joined to a directory it names a file in that directory and nowhere else."""
    if (name in ("", ".", "..") or "/" in name or "\\" in name
            or any(unicodedata.category(c) in UNPRINTABLE for c in name)):
        raise DownloadError(f"refusing to save the download as {name!r}: not a plain file name (no /, \\, "
                            "'..', NUL or control characters); nothing was written")
    # A hidden name could be another download's .part; a trailing space or dot is a name
    # nobody means (and Windows drops); over 255 bytes no file system here takes it.
    if name.startswith(".") or name != name.rstrip(" .") or len(name.encode()) > 255 or not name.strip(". "):
        raise DownloadError(f"refusing to save the download as {name[:80]!r}: a model's file name must not start "
                            "with a dot, end in a space or dot, or be longer than 255 bytes; nothing was written")
    return name


def _range_total(content_range: str) -> int | None:
    """The file's size in a Content-Range header (``bytes */N`` or ``bytes A-B/N``)."""
    total = content_range.rpartition("/")[2].strip()
    return int(total) if content_range.startswith("bytes ") and total.isdigit() else None


def _published_sha256(resp: aiohttp.ClientResponse, hops: list[Mapping[str, str]]) -> str | None:
    """The hub's hash of an LFS file: ``X-Linked-Etag`` on the answer (or on the redirect to its storage)."""
    for headers in (resp.headers, *hops):
        etag = headers.get("X-Linked-Etag", "").strip('"').lower()
        if SHA256.match(etag):
            return etag
    return None


def progress_bar(stream=sys.stderr) -> Callable[[Progress], None]:
    """A one-line progress bar (size, speed, time left), redrawn at most 10 times a second."""
    last = [0.0]
    decile = [-1]
    tty = stream.isatty()

    def show(p: Progress) -> None:
        now = time.monotonic()
        finished = p.total is not None and p.done >= p.total
        if tty and now - last[0] < 0.1 and not finished:
            return
        if not tty:  # a log: one line per tenth
            step = int(10 * p.done / p.total) if p.total else 0
            if step == decile[0] and not finished:
                return
            decile[0] = step
        last[0] = now
        elapsed = max(now - p.started_at, 1e-6)
        speed = (p.done - p.resumed_from) / elapsed
        if p.total:
            pct = 100 * p.done / p.total
            left = (p.total - p.done) / speed if speed > 0 else float("inf")
            eta = f"{left:.0f} s left" if left != float("inf") else "--"
            width = 24
            fill = int(width * p.done / p.total)
            line = (f"{p.name} [{'#' * fill}{'.' * (width - fill)}] {pct:5.1f} %  {_size(p.done)} / {_size(p.total)}"
                    f"  {_size(speed)}/s  {eta}")
        else:
            line = f"{p.name}  {_size(p.done)}  {_size(speed)}/s"
        if tty:
            stream.write("\r" + line.ljust(100) + ("\n" if finished else ""))
        else:
            stream.write(line + "\n")
        stream.flush()

    return show


async def pull(source: str, dest_dir: Path, *, sha256: str | None = None, revision: str = "main",
               progress: Callable[[Progress], None] | None = None, timeout_s: float = 60.0) -> Path:
    """Download the GGUF file ``source`` into ``dest_dir``; returns the final path."""
    url = resolve_source(source, revision)
    name = file_name(url)
    if sha256 is not None and not SHA256.match(sha256.lower()):
        raise DownloadError("--sha256 must be 64 hex digits")
    dest_dir.mkdir(parents=True, exist_ok=True)
    return await fetch(url, dest_dir / name, sha256=sha256, progress=progress, timeout_s=timeout_s,
                       magic=GGUF_MAGIC, show_hash=True)


def part_path(final: Path) -> Path:
    """Where the bytes of ``final`` gather until they are complete and verified."""
    return final.parent / f".{final.name}.part"


async def fetch(url: str, final: Path, *, sha256: str | None = None,
                progress: Callable[[Progress], None] | None = None, timeout_s: float = 60.0,
                magic: bytes | None = None, max_bytes: int | None = None, size: int | None = None,
                headers: dict[str, str] | None = None, show_hash: bool = False, _restarted: bool = False) -> Path:
    """Download ``url`` to ``final`` (whose directory exists), safely: into its ``.part``
    beside it, hashed as it arrives, resumed with a range request, renamed into place only
    when complete and, with ``sha256`` (else a hash the server publishes), verified.

    ``magic``: what the file must start with (a web page instead of the file is refused at
    its first bytes); ``max_bytes``: the most it may be (a server sending more is cut off,
    and nothing is kept); ``size``: exactly what it must be (checked on the ``.part``
    before it takes ``final``'s place: a file already at ``final`` is never replaced by
    one of another size); ``headers``: more request headers (sent to the first host only).
    What is given by another party's word (a manifest's size and digest) is held to it
    here. Redirects: see the module's docstring. ``show_hash``: a mismatch's error says the
    hash of what came (for the person downloading it themselves: ``anyad pull``); otherwise
    it does not, for what came may be another host's, and the error goes to a client.
    """
    name = final.name
    expected = sha256.lower() if sha256 else None
    if expected is not None and not SHA256.match(expected):
        raise DownloadError(f"{name}: the expected SHA-256 must be 64 hex digits")
    dest_dir = final.parent
    part = part_path(final)
    if size is not None:
        max_bytes = size if max_bytes is None else min(max_bytes, size)
    again = functools.partial(fetch, url, final, sha256=sha256, progress=progress, timeout_s=timeout_s, magic=magic,
                              max_bytes=max_bytes, size=size, headers=headers, show_hash=show_hash, _restarted=True)

    have = part.stat().st_size if part.exists() else 0
    if max_bytes is not None and have > max_bytes:  # not the part of this file
        part.unlink()
        have = 0
    digest = hashlib.sha256()
    head = b""  # the file's first bytes, up to the length of ``magic``
    want = len(magic) if magic else 0
    if have:
        with part.open("rb") as f:  # the hash continues from the bytes already here
            for block in iter(lambda: f.read(CHUNK), b""):
                head = head or block[:want]
                digest.update(block)
        if magic and not magic.startswith(head):  # left by an older anyad that did not check: start again
            part.unlink()
            have, digest, head = 0, hashlib.sha256(), b""
    content_type: str | None = None  # what the server said it sent, for the error when it is not the file
    request_headers = {"User-Agent": f"anyad/{__version__}", **(headers or {})}
    if have:
        request_headers["Range"] = f"bytes={have}-"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    guard = _Guard(URL(url))
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(resolver=guard)) as session:
        try:
            resp, hops = await _get(session, url, request_headers, guard)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if (why := _refused(exc)) is not None:
                raise DownloadError(f"{name}: {why}; nothing was fetched") from None
            raise DownloadError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
        async with resp:
            if resp.status == 416 and have:
                # The part is whole only if the server says the file has exactly its size;
                # anything else (a different or unknown size) is a part to throw away.
                if _range_total(resp.headers.get("Content-Range", "")) != have:
                    part.unlink(missing_ok=True)
                    if _restarted:
                        raise DownloadError(f"the server refuses every range of {url}; nothing was kept")
                    return await again()
                total: int | None = have
                expected = expected or _published_sha256(resp, hops)
            elif resp.status == 404:
                raise DownloadError(f"not found (404): {url}")
            elif resp.status >= 400:
                raise DownloadError(f"the server refused the download: {resp.status} {resp.reason}: {url}")
            else:
                content_type = resp.headers.get("Content-Type")
                if resp.status == 200 and have:  # no range support: start again
                    have, digest, head = 0, hashlib.sha256(), b""
                elif resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    part.unlink(missing_ok=True)  # not the rest of what we have: appending it would corrupt
                    if _restarted:
                        raise DownloadError(f"the server answers ranges of {url} wrongly; nothing was kept")
                    return await again()
                length = resp.content_length
                total = have + length if length is not None else None
                if max_bytes is not None and total is not None and total > max_bytes:
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"{name}: the server sends {total} bytes, more than the {max_bytes} "
                                        "expected; nothing was kept")
                expected = expected or _published_sha256(resp, hops)
                free = shutil.disk_usage(dest_dir).free
                if length is not None and length > free:
                    raise DownloadError(f"not enough disk space in {dest_dir}: the download needs {_size(length)} "
                                        f"more, {_size(free)} is free")
                p = Progress(name, total, have, time.monotonic(), have)
                try:
                    with part.open("ab" if have else "wb") as f:
                        async for block in resp.content.iter_chunked(CHUNK):
                            if len(head) < want:
                                head += block[:want - len(head)]
                                if magic is not None and not magic.startswith(head):  # (want > 0 only with a magic)
                                    resp.close()  # a web page, not the file: fetch no more of it
                                    break
                            if max_bytes is not None and p.done + len(block) > max_bytes:
                                resp.close()
                                f.close()
                                part.unlink(missing_ok=True)
                                raise DownloadError(f"{name}: the server sends more than the {max_bytes} bytes "
                                                    "expected; nothing was kept")
                            f.write(block)
                            digest.update(block)
                            p.done += len(block)
                            if progress:
                                progress(p)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise DownloadError(f"the disk is full ({dest_dir}); {_size(p.done)} of "
                                            f"{_size(total) if total else '?'} are kept in {part}: free some space "
                                            "and run the same command again to resume") from None
                    raise DownloadError(f"cannot write {part}: {exc.strerror}") from None
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise DownloadError(f"the download was interrupted after {_size(p.done)}"
                                        f"{' of ' + _size(total) if total else ''} ({type(exc).__name__}); "
                                        "run the same command again to resume") from None
                if total is not None and p.done < total and (not magic or magic.startswith(head)):
                    raise DownloadError(f"the download was interrupted after {_size(p.done)} of {_size(total)}; "
                                        "run the same command again to resume")
    if magic and head != magic:
        part.unlink(missing_ok=True)
        sent = f", Content-Type {content_type}" if content_type else ""
        raise DownloadError(f"{url} is not a GGUF file (it starts with {head!r}{sent}); nothing was kept. "
                            "Is it a web page rather than the file's download link?")
    got = part.stat().st_size if part.exists() else 0
    if size is not None and got != size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: the server sent {got} bytes, {size} were expected; nothing was kept")
    if expected is not None and (actual := digest.hexdigest()) != expected:
        part.unlink(missing_ok=True)
        got_hash = f"the download has {actual}" if show_hash else "the download's bytes are other ones"
        raise DownloadError(f"{name}: SHA-256 mismatch: expected {expected}, {got_hash}; nothing was kept")
    os.replace(part, final)
    return final
