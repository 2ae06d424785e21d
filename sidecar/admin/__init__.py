"""Admin: what operators and key holders ask of the sidecar beyond the proxied API. `api.Admin` (the admin API:
keys, audit log, usage, requests), `own_usage.OwnUsage` (`/v1/usage`: a key's own usage report), `console.Console`
(the web console, its files in `console_static/`; `oidc.Oidc`, its operators' OpenID Connect sign-in) and
`commands` (the CLI's store-facing commands and reports); `params` checks query parameters, `tables` renders rows
as text or CSV and `throttle` counts failed admin tokens and console sign-ins per client address and port. Its
face: `api`, `console`, `oidc`, `own_usage`, `commands`.
"""

__all__ = ["api", "commands", "console", "oidc", "own_usage"]
