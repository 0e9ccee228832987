"""API keys at the door: who is asking, and may they?"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from optiinfra.auth import ApiKeys, Permission, Principal, credential_from_headers


class Unauthenticated(Exception):
    """No usable key was presented (401)."""


class Forbidden(Exception):
    """The key's role does not allow this (403)."""

    def __init__(self, principal: Principal, permission: Permission) -> None:
        super().__init__(f"role {principal.role.value} may not {permission.value}")
        self.principal = principal
        self.permission = permission


class Guard:
    """
    Checks requests against the configured keys; lets everything through when
    there are none (the service refuses to start that way in production).
    """

    def __init__(self, keys: ApiKeys | None) -> None:
        self.keys = keys

    def check(self, request: IRequest, permission: Permission) -> Principal | None:
        """The caller, or raise L{Unauthenticated} / L{Forbidden}."""
        if self.keys is None:
            return None
        presented = credential_from_headers(
            request.getHeader(b"authorization"), request.getHeader(b"x-api-key")
        )
        principal = self.keys.authenticate(presented)
        if principal is None:
            raise Unauthenticated()
        # Named in the access log, allowed or not.
        request.principal = principal  # type: ignore[attr-defined]
        if not principal.allows(permission):
            raise Forbidden(principal, permission)
        return principal
