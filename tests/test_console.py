"""The console's files and headers, and C{GET /whoami} that adapts it to the key."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest_twisted

from optiinfra.auth import Permission, Role, generate
from optiinfra.console.routes import SECURITY_HEADERS

from .conftest import StartService

STATIC = resources.files("optiinfra.console") / "static"


def test_the_page_has_no_inline_script_and_nothing_from_elsewhere() -> None:
    page = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.DOTALL)
    assert scripts == [""]  # one, empty: its code comes from a file
    assert not re.search(r"<[^>]+\son[a-z]+=", page)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    for name in ("console.js", "feed.js", "api.js"):
        code = (STATIC / name).read_text()
        assert "innerHTML" not in code, name  # text only, never parsed as HTML
        assert "localStorage" not in code, name  # the key stays in sessionStorage
        assert not re.search(r"https?://", code), name


@pytest_twisted.ensureDeferred
async def test_console_files_are_served_with_strict_headers(
    start_service: StartService,
) -> None:
    service = await start_service()
    for path, kind in [
        ("/console", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/feed.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
    ]:
        response = await service.get(path)
        body = await response.content()
        assert response.code == 200, path
        assert response.headers.getRawHeaders("content-type") == [kind]
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.getRawHeaders(name.decode()) == [value.decode()]
        assert body
    csp = SECURITY_HEADERS[b"content-security-policy"].decode()
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert SECURITY_HEADERS[b"x-frame-options"] == b"DENY"
    missing = await service.get("/console/nothing.js")
    assert missing.code == 404
    assert (await missing.json())["name"] == "nothing.js"


@pytest_twisted.ensureDeferred
async def test_whoami_tells_the_page_what_the_key_may_do(
    start_service: StartService, tmp_path: Path
) -> None:
    keys, lines = {}, []
    for role in Role:
        key, line = generate(f"{role.value}-1", role)
        keys[role] = key
        lines.append(line)
    (tmp_path / "keys").write_text("\n".join(lines) + "\n")
    service = await start_service(api_keys_file=tmp_path / "keys")
    assert (await service.get("/whoami")).code == 401
    for role in Role:
        response = await service.get(
            "/whoami", headers={"Authorization": f"Bearer {keys[role]}"}
        )
        body = await response.json()
        assert body["name"] == f"{role.value}-1"
        assert body["role"] == role.value
        assert set(body["permissions"]) == {
            p.value for p in Permission if role.allows(p)
        }
    viewer = await service.get(
        "/whoami", headers={"Authorization": f"Bearer {keys[Role.VIEWER]}"}
    )
    assert "operate" not in (await viewer.json())["permissions"]

    open_service = await start_service(auth_disabled=True)
    body = await (await open_service.get("/whoami")).json()
    assert body == {
        "name": None,
        "role": None,
        "permissions": [p.value for p in Permission],
    }


@pytest_twisted.ensureDeferred
async def test_plans_listing_for_the_console(start_service: StartService) -> None:
    service = await start_service()
    rec = {
        "id": "r1",
        "agent_id": "cost-agent",
        "agent_type": "cost",
        "customer_id": "acme",
        "type": "optimization",
        "title": "t",
        "action": "right_size",
        "risk_level": "low",
        "affected_resources": ["res-1"],
    }
    response = await service.request(
        "POST",
        "/coordination/coordinate",
        json={"customer_id": "acme", "recommendations": [rec]},
    )
    [plan] = (await response.json())["execution_plans"]
    listed = await (await service.get("/coordination/plans")).json()
    assert [p["id"] for p in listed["plans"]] == [plan["id"]]
    assert listed["plans"][0] == plan
    assert (listed["count"], listed["limit"], listed["offset"]) == (1, 100, 0)
    done = await (await service.get("/coordination/plans?status=completed")).json()
    assert done["plans"] == []
    bad = await service.get("/coordination/plans?status=sideways")
    assert bad.code == 400
    assert (await bad.json())["field"] == "status"
