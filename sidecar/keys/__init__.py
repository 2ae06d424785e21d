"""Keys: API keys and who holds them. `format` (the key's shape and its hash), `pepper` (the secret hashes are
keyed with, and its fingerprint in the store), `static` (keys listed in a file), `service.KeyAdmin` (the one
service that creates and changes keys, each change with its admin audit row) and `auth.Authenticator` (a bearer
key to a `Principal`, cached), `salts` (the prefix-cache salt a key's requests carry to vLLM). Every module is
its face.
"""

__all__ = ["auth", "format", "pepper", "salts", "service", "static"]
