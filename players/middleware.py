"""The profile download's short cut past the middleware it does not use.

A download is a GET by token: no session (unless the browser measured round-trip times), no signed-in user, no
form, no message. Sent through the whole stack, session, CSRF, authentication, messages and axes cost more than
the view itself (benchmarks/profile_download.py). So this middleware, placed after SecurityMiddleware and
WhiteNoise, answers a download that succeeds with players.views.download_response and adds the headers the
middleware it skips would have added (X-Frame-Options, the CSP). Everything else goes on through the stack as
before: a browser with a session cookie (its measured times rank the servers), and every refusal (an unknown or
malformed link, a revoked player, a switched-off device, a server that is not ready), whose pages need the whole
stack. The URL is resolved through the URLconf (once per path and process), so the URL patterns remain the one
place that defines it.
"""

from __future__ import annotations

import functools

from django.conf import settings
from django.http import Http404
from django.urls import Resolver404, resolve

from lanhub.middleware import CSP
from players import views


class ProfileDownloadMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if (request.method == "GET" and request.path_info.endswith(".ovpn")
                and settings.SESSION_COOKIE_NAME not in request.COOKIES):
            response = self._download(request)
            if response is not None:
                return response
        return self.get_response(request)

    def _download(self, request):
        # The request's own URLconf if a middleware set one, as the handler would resolve with (none does here).
        arguments = _download_arguments(request.path_info, getattr(request, "urlconf", None) or settings.ROOT_URLCONF)
        if arguments is None:
            return None
        try:
            response = views.download_response(request, *arguments)
        except Http404:
            return None  # the whole stack answers, with the page that explains
        if response is not None:
            response.setdefault("X-Frame-Options", settings.X_FRAME_OPTIONS)  # XFrameOptionsMiddleware
            response.setdefault("Content-Security-Policy", CSP)  # lanhub.middleware
        return response


@functools.lru_cache(maxsize=4096)
def _download_arguments(path: str, urlconf) -> tuple[str, str, str | None] | None:
    """(token, node_ref, ref): the download view's arguments if the URLconf sends `path` to it, else None. Kept
    per process for the paths last seen (a player's downloads repeat one path): resolving walks the URL patterns,
    a tenth of the download's own time. Keyed by the URLconf too, so another one (a test's override) resolves
    afresh."""
    try:
        match = resolve(path, urlconf)
    except Resolver404:
        return None
    if match.func is not views.profile_download:
        return None
    return match.kwargs["token"], match.kwargs["node_ref"], match.kwargs.get("ref")
