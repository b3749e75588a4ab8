"""`megrez-mlc serve`: an OpenAI-compatible HTTP server (server.py) over a continuous-batching engine loop
(scheduler.py)."""
