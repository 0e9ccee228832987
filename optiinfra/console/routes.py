"""
C{GET /console}: the operators' console, files shipped in the package.

Plain JavaScript modules, no build step and nothing fetched from elsewhere:
the files are read once at start-up and served with a strict
Content-Security-Policy (scripts and styles from this origin only, no inline
script, no framing).  The page asks for an API key and keeps it in
C{sessionStorage}; every call it makes carries the key, and the server checks
roles as it does for any client.  C{GET /whoami} tells the page the key's role,
so that a viewer is shown no buttons.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from klein import Klein
from twisted.web.iweb import IRequest

from optiinfra.auth import Permission
from optiinfra.web.app import route
from optiinfra.web.guard import Guard
from optiinfra.web.render import render_error, render_json

#: Served with every console file.
SECURITY_HEADERS: Final = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; "
        b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
        b"form-action 'self'; frame-ancestors 'none'"
    ),
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}

_TYPES: Final = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
}


def load_files() -> dict[str, tuple[bytes, bytes]]:
    """Every file of the console: name -> (content type, content)."""
    folder = resources.files("optiinfra.console") / "static"
    files = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind(".") :]
        if entry.is_file() and suffix in _TYPES:
            files[entry.name] = (_TYPES[suffix], entry.read_bytes())
    return files


def _serve(request: IRequest, kind: bytes, content: bytes) -> bytes:
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"content-type", kind)
    request.setHeader(b"content-length", str(len(content)).encode())
    return content


def mount(app: Klein, guard: Guard) -> None:
    files = load_files()

    @route(app, "/console", ("GET",))
    def page(request: IRequest) -> bytes:
        return _serve(request, *files["index.html"])

    @route(app, "/console/{name}", ("GET",))
    def file(request: IRequest, name: str) -> bytes:
        found = files.get(name)
        if found is None:
            return render_error(request, 404, "not found", name=name)
        return _serve(request, *found)

    @route(app, "/whoami", ("GET",))
    def whoami(request: IRequest) -> bytes:
        principal = guard.check(request, Permission.READ_AGENTS)
        if principal is None:  # no keys configured: everyone may do everything
            return render_json(
                request,
                {
                    "name": None,
                    "role": None,
                    "permissions": [p.value for p in Permission],
                },
            )
        return render_json(
            request,
            {
                "name": principal.name,
                "role": principal.role.value,
                "permissions": [p.value for p in Permission if principal.allows(p)],
            },
        )
