"""Integrations with serving engines (vLLM). Nothing here is imported by ``adafuse_compile``
itself: each integration imports its engine lazily, so the package never needs one installed."""
