"""How the data stages talk to a photo host: one retry policy for the archive and for every photo."""

from __future__ import annotations

from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

USER_AGENT = "chromalab (+Unsplash Lite research download)"
# Worth another try: rate limiting and the server's own failures. 404/410/451 are final (the photo is gone).
RETRY_STATUSES = (429, 500, 502, 503, 504)
# Answers that are a page about the request (sign-in, error, rate limit), not the file asked for.
PAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml+xml")
RETRY_AFTER_MAX_S = 300  # a 429's Retry-After beyond this is cut to it rather than stalling for hours


class _Retry(Retry):
    """urllib3's Retry, except that a Retry-After it cannot read ("soon") means the usual backoff: urllib3
    raises InvalidHeader there, ending a transfer the server asked to be retried."""

    def get_retry_after(self, response) -> float | None:
        try:
            return super().get_retry_after(response)
        except InvalidHeader:
            return None


def content_type(headers) -> str:
    """An answer's media type, lower case, without parameters ("" when it names none)."""
    return headers.get("Content-Type", "").split(";")[0].strip().lower()


def retry_policy(retries: int, backoff_s: float, **options) -> Retry:
    """urllib3's retries of connection errors, reads and RETRY_STATUSES, honouring Retry-After, with
    exponential backoff; the last answer is returned rather than raised, so its status makes the message."""
    return _Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=backoff_s,
                 status_forcelist=RETRY_STATUSES, allowed_methods={"GET"}, respect_retry_after_header=True,
                 retry_after_max=RETRY_AFTER_MAX_S, raise_on_status=False, **options)
