"""``python -m agentrun_sse``: read the settings, then serve the app under uvicorn.

Owns the SSE server's process: logging and the exit status
(2 for a configuration error, with a message naming the setting).
Never: holds Kubernetes credentials (outside ``--no-auth``), or serves anything itself.
"""

from __future__ import annotations

import logging
import sys

from agentrun_sse import app as app_mod
from agentrun_sse import settings as settings_mod


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_mod.load(argv=argv)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        # httpx logs each request to the API server at INFO: noise, one line per stream.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        app = app_mod.create_app(settings)
    except settings_mod.ConfigError as e:
        print(f"agentrun-sse: configuration error: {e}", file=sys.stderr)
        return 2
    config = app_mod.uvicorn_config(app, settings)
    # uvicorn's own runner: it picks uvloop and httptools when installed (uvicorn[standard]).
    app_mod.Server(config, app=app).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
