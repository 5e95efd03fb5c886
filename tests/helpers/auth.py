"""Real users for any service's tests, made through the real identity endpoints.

    me = await register_and_login(client)                        # a customer with role "user"
    trader = await register_and_login(client, roles=("trader",))
    support = await register_and_login(client, roles=("support",))  # a platform (staff) user
    await client.get("/api/v1/users/me", headers=me.headers)

`client` is a litestar.testing.AsyncTestClient over api.app.create_app(settings). Roles
are granted by a bootstrap admin (services.identity.create_admin) through
PUT /api/v1/admin/users/{id}/roles; staff roles (support, auditor, admin) are created as
platform users through POST /api/v1/admin/platform-users, as the service requires.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from services.identity import create_admin
from services.identity_common import STAFF_ROLES

DEFAULT_PASSWORD = "Correct-Horse-42"
HELPER_ADMIN_EMAIL = "helper-admin@fintide.test"
HELPER_ADMIN_PASSWORD = "Bootstrap-Secret-42"


@dataclass(frozen=True)
class LoggedIn:
    user_id: uuid.UUID
    email: str
    password: str
    access_token: str
    refresh_token: str
    session_id: str
    roles: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=dict)


def _check(response: Any, expected: int, what: str) -> Any:
    assert response.status_code == expected, f"{what}: {response.status_code} {response.text}"
    return response.json()


async def login(client: Any, email: str, password: str, roles: tuple[str, ...] = ()) -> LoggedIn:
    body = _check(await client.post("/api/v1/auth/login", json={"email": email, "password": password}),
                  200, f"login {email}")
    return LoggedIn(user_id=uuid.UUID(body["user_id"]), email=email, password=password,
                    access_token=body["access_token"], refresh_token=body["refresh_token"],
                    session_id=body["session_id"], roles=roles,
                    headers={"Authorization": f"Bearer {body['access_token']}"})


async def admin_login(client: Any) -> LoggedIn:
    """Log in as the bootstrap admin of the app's database (created on first use)."""
    settings = client.app.state.settings
    await create_admin(settings, HELPER_ADMIN_EMAIL, HELPER_ADMIN_PASSWORD)
    return await login(client, HELPER_ADMIN_EMAIL, HELPER_ADMIN_PASSWORD, ("admin", "user"))


async def register_and_login(client: Any, *, email: str | None = None, password: str = DEFAULT_PASSWORD,
                             roles: tuple[str, ...] = ("user",), **profile: Any) -> LoggedIn:
    """Create a user with `roles` through the API and log them in."""
    email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
    wanted = tuple(sorted(set(roles) | {"user"}))
    if set(wanted) & STAFF_ROLES:
        admin = await admin_login(client)
        _check(await client.post("/api/v1/admin/platform-users", headers=admin.headers,
                                 json={"email": email, "password": password, "roles": list(wanted), **profile}),
               201, f"create platform user {email}")
    else:
        created = _check(await client.post("/api/v1/auth/register",
                                           json={"email": email, "password": password, **profile}),
                         201, f"register {email}")
        if wanted != ("user",):
            admin = await admin_login(client)
            _check(await client.put(f"/api/v1/admin/users/{created['id']}/roles", headers=admin.headers,
                                    json={"roles": list(wanted)}), 200, f"grant {wanted}")
    return await login(client, email, password, wanted)
