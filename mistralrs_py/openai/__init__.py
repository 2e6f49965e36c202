"""OpenAI semantics below the HTTP layer, shared by every front end: wire types and their checks
(protocol.py), engine events -> responses and chunks (responses.py), and the service that turns a
request body into a generation (service.py)."""
