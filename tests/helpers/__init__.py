"""Helpers shared by the test modules, by job: `models` (tiny models and weights files), `images` (image
files, bytes and folders), `processes` (the CLI in this process or as a child, capped children, the live
server, free ports), `browser` (headless Chromium), `shared_data` (the read-only data beside the checkout),
`requirements` (a missing test tool: skipped locally, a failure in CI).
The independent reference formulations the engine is checked against live in tests/reference.py."""
