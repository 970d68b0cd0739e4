"""OpenAI-compatible routes under ``/v1``: what OpenAI's clients and SDKs call.

One module per resource, each with its own ``router`` (``routes.routers`` lists them in the
order the app includes them); errors on ``/v1`` paths take OpenAI's shape
(``errors.py``), and the API key is the same ``MODELHOST_API_KEY``, sent as OpenAI clients
send it (``Authorization: Bearer``).

This package module imports nothing: ``api/errors.py`` imports ``errors.py`` here, and
importing it must not import the route modules, which import ``api/errors.py``.
"""
