"""Authentication and authorization for every port: one provider layer.

Pure decision code (``settings``, ``identity``, ``apikeys``, ``certs``, ``jwt``,
``ratelimit``, ``cors``, ``policy``) imports no trio and does no I/O beyond reading
its files once at start-up (``build``); ``tls`` is the thin trio layer that serves
TLS contexts and re-reads certificates on SIGHUP or when their files change.
Kept free of imports here so that ``tei_manager.config`` can import ``settings``.
"""
