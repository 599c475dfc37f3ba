"""The HTTP server: request and response schemas, one engine worker per model, and the ASGI app with
its web page (static/)."""
