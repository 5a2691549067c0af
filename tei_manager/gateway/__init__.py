"""Inference front doors' shared core: which instance, admission, and the relay.

The HTTP routes (OpenAI's ``/v1/*``, TEI's ``/tei/{model}/*``) stay thin: they
decode their body, ask the :class:`~tei_manager.gateway.relay.Gateway` for a
:class:`~tei_manager.gateway.relay.Session` on the model the client named, make
tei.v1 calls through it (over the multiplexer's pooled HTTP/2 connections) and
encode the replies. Failures are :class:`~tei_manager.gateway.errors.InferenceError`
with a front-door-neutral kind; each door maps kinds to its own error shape.
"""
