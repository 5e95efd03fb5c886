"""The identity service's REST routes, gathered into one router for api.app.API_MODULES.

Handlers live beside this module: identity_login (/auth), identity_users (/users),
identity_admin (/admin, /identity email registry, /dev outbox).
"""

from __future__ import annotations

from litestar import Router

from api.identity_admin import admin_router, dev_router, registry_router
from api.identity_login import router as auth_router
from api.identity_users import router as users_router

router = Router(path="/", route_handlers=[auth_router, users_router, admin_router, registry_router, dev_router])
