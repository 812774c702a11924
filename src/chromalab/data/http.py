"""How the data stages talk to a photo host: one retry policy for the archive and for every photo."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import urllib3
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from chromalab.errors import printable

USER_AGENT = "chromalab (+Unsplash Lite research download)"
# Worth another try: rate limiting and the server's own failures. 404/410/451 are final (the photo is gone).
RETRY_STATUSES = (429, 500, 502, 503, 504)
# Answers that are a page about the request (sign-in, error, rate limit), not the file asked for.
PAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml+xml")
RETRY_AFTER_MAX_S = 300  # a 429's Retry-After beyond this is cut to it rather than stalling for hours
MAX_REDIRECTS = 10  # hops to follow (a CDN's); they do not use up the retries
TOO_MANY_REDIRECTS = "too many redirects (a redirect loop?)"
NOT_HTTP = "sent to a URL that is not http(s) with a host"  # a redirect to ftp:// or file://


class _Retry(Retry):
    """urllib3's Retry, except that a Retry-After it cannot read ("soon", a date in the year 99999) means the
    usual backoff (urllib3 raises there, ending a transfer the server asked to be retried), and that a redirect
    is no retry."""

    def get_retry_after(self, response) -> float | None:
        try:
            return super().get_retry_after(response)
        except (InvalidHeader, ValueError, OverflowError):  # ValueError, OverflowError: a date out of range
            return None

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        """A redirect is no retry: it uses up `redirect` only, not the total that bounds a photo's tries
        (requests counts its hops apart too)."""
        retry = self
        if error is None and response is not None and response.get_redirect_location() and self.total is not None:
            retry = self.new(total=self.total + 1)
        return super(_Retry, retry).increment(method, url, response, error, _pool, _stacktrace)


def content_type(headers) -> str:
    """An answer's media type, lower case, without parameters ("" when it names none), fit for a message."""
    return printable(headers.get("Content-Type", "").split(";")[0].strip().lower())


def retry_policy(retries: int, backoff_s: float, retry_after_max_s: float = RETRY_AFTER_MAX_S, **options) -> Retry:
    """urllib3's retries of connection errors, reads and RETRY_STATUSES, honouring Retry-After up to
    `retry_after_max_s`, with exponential backoff; the last answer is returned rather than raised, so its status
    makes the message. Up to MAX_REDIRECTS hops besides."""
    return _Retry(total=retries, connect=retries, read=retries, status=retries, redirect=MAX_REDIRECTS,
                 backoff_factor=backoff_s,
                 status_forcelist=RETRY_STATUSES, allowed_methods={"GET"}, respect_retry_after_header=True,
                 retry_after_max=retry_after_max_s, raise_on_status=False, **options)


def transport_failure(exc: BaseException) -> str:
    """A failure before or during an answer, in words: its kind, and what broke (an answer head too long, a
    redirect to no http(s) URL), the server's text escaped."""
    if isinstance(exc, urllib3.exceptions.LocationParseError):  # a host label over 63 characters, for one
        return f"sent to a URL it cannot parse ({printable(str(exc), 100)})"
    if isinstance(exc, (urllib3.exceptions.LocationValueError, urllib3.exceptions.URLSchemeUnknown)):
        return f"{NOT_HTTP} ({type(exc).__name__})"
    if isinstance(exc, urllib3.exceptions.NameResolutionError):
        return "host not found (check the URL's host name and the network)"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # refused, no route, …: the OS says which
        reason = getattr(exc.__cause__ or exc.__context__, "strerror", None)
        return f"no connection ({reason.lower()})" if reason else "no connection"
    inner = exc.args[-1] if isinstance(exc, urllib3.exceptions.ProtocolError) and exc.args else None
    if isinstance(inner, Exception) and str(inner):  # http.client's reason the answer could not be read
        return f"{type(exc).__name__} ({printable(str(inner), 80)})"
    return type(exc).__name__


_try = threading.local()  # `started`: when this thread's latest request began waiting for its answer


def try_started() -> float:
    """When this thread's latest try (urllib3 may make several per request) began waiting for its answer
    (time.monotonic): where its head's deadline started, and what the body's deadline is counted from."""
    return _try.started


class _HeadersDeadline:
    """A connection that gives up on an answer whose status line and headers take over `headers_deadline_s`
    in all: the read timeout holds for each read only, so a server sending a header line now and then would
    hold it for ever. Raised as a timeout, which urllib3 retries as a read timeout. Each try is stamped
    (`try_started`)."""

    headers_deadline_s: float

    def getresponse(self, *args, **kwargs):
        _try.started = time.monotonic()
        lock, state = threading.Lock(), {"done": False, "cut": False}

        def cut_off():
            with lock:
                if not state["done"]:
                    state["cut"] = True
                    with contextlib.suppress(OSError, AttributeError):
                        self.sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.headers_deadline_s, cut_off)
        timer.daemon = True
        timer.start()
        try:
            response = super().getresponse(*args, **kwargs)
        except Exception:
            if not state["cut"]:
                raise
            response = None
        finally:
            with lock:
                state["done"] = True
            timer.cancel()
        if state["cut"]:  # cut off mid-head, http.client may take the end of the stream for the end of the head
            if response is not None:
                response.close()
            raise TimeoutError(f"no whole answer head within {self.headers_deadline_s:g} s")
        return response


def with_headers_deadline(pool_manager: urllib3.PoolManager, deadline_s: float) -> urllib3.PoolManager:
    """`pool_manager`, its connections bounded by `_HeadersDeadline` (set before its first request)."""
    pool_manager.pool_classes_by_scheme = {
        scheme: type(pool.__name__, (pool,), {"ConnectionCls": type(
            pool.ConnectionCls.__name__, (_HeadersDeadline, pool.ConnectionCls), {"headers_deadline_s": deadline_s})})
        for scheme, pool in urllib3.poolmanager.pool_classes_by_scheme.items()
    }
    return pool_manager
