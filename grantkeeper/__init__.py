"""grantkeeper: keeps OAuth 2.0 grants alive, encrypted, lock-guarded and audited.

Application code reads tokens through :mod:`grantkeeper.api`.
"""
