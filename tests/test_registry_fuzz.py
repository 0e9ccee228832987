import pytest_twisted

from .conftest import RunningService


async def show(service, method, path, body=b"", headers=None):
    r = await service.request(
        method, path, data=body, headers=headers, allow_redirects=False
    )
    c = await r.content()
    print(method, path, r.code, r.headers.getRawHeaders("content-type"), c[:200])
    return r


@pytest_twisted.ensureDeferred
async def test_scratch(service: RunningService) -> None:
    r = await show(
        service,
        "POST",
        "/agents/register",
        b'{"name":"a:b@c","type":"cost","host":"h","port":1}',
        {"Content-Type": ["application/json"]},
    )
    for raw in [
        "a:b@c",
        "a%3Ab%40c",
        "a%2Fb",
        "",
        "%20",
        "x%00",
        "..",
        ".",
        "%2e%2e",
        "a/b",
        "%ff",
        "%C3%A9",
        "a?b",
        "a%3Fb",
        "a#b",
        "a;b",
        "a%25b",
    ]:
        await show(service, "POST", f"/agents/{raw}/heartbeat", b"")
        await show(service, "POST", f"/api/v1/agents/{raw}/heartbeat", b"")
    await show(service, "POST", "/agents/register/", b"")
    await show(service, "POST", "/agents/register", b"\x00")
    await show(service, "POST", "/agents/register", b'{"name":"\\ud800"}')
    await show(
        service, "POST", "/agents/register", b'{"port":100000000000000000000000}'
    )
    for n in (1024 * 1024 + 1, 3 * 1024 * 1024):
        try:
            await show(service, "POST", "/agents/register", b"[" + b" " * n + b"]")
        except Exception as e:
            print("ERR", n, repr(e))
