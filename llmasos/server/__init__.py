"""The OpenAI-compatible HTTP server (the system calls of the OS): routes, auth, metering, limits, metrics."""
