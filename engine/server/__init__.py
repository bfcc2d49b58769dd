"""`pocketinfer serve`: the OpenAI-compatible HTTP server (the `server` extra: starlette and uvicorn)."""
