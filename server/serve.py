"""`specvlm serve`: the OpenAI-compatible HTTP server.

    specvlm serve                                   # demo model on 127.0.0.1:8000
    specvlm serve --model ./llava-ckpt --draft ./llava-draft --host 0.0.0.0

SIGTERM or SIGINT starts a graceful shutdown: new requests get 503, running ones get
--shutdown-grace-seconds to finish before they are aborted, and the process exits 0.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

logger = logging.getLogger(__name__)

def add_parser(subparsers) -> None:
    from server.cli import add_config_flags

    parser = subparsers.add_parser(
        "serve", help="run the HTTP server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.api.lifecycle import CLOSE_TIMEOUT_SECONDS, DrainingServer
    from server.cli import config_from_args, setup_logging
    from server.engine.engine import Engine
    from server.metrics import Metrics

    config = config_from_args(args)
    setup_logging(config.log_level)
    shown = config.model_dump()
    if shown.get("api_key"):
        shown["api_key"] = "***"
    logger.info("resolved config: %s", shown)

    engine = Engine(config)
    metrics = Metrics(engine.model_name)
    engine.metrics = metrics
    engine.start()  # loads the models on the engine thread; /health is 503 until then
    app = create_app(config, engine, metrics)
    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=CLOSE_TIMEOUT_SECONDS,
    )
    server = DrainingServer(uvicorn_config, app.state.lifecycle)
    threading.Thread(target=_stop_if_engine_dies, args=(engine, server), daemon=True).start()
    try:
        server.run()
    finally:
        engine.shutdown()
    if not engine.alive:
        logger.error("exiting because the engine failed: %s", engine.load_error)
        return 1
    logger.info("server stopped")
    return 0


def _stop_if_engine_dies(engine, server) -> None:
    """Stop the HTTP server when the engine thread fails, so that the process exits non-zero."""
    while not server.should_exit:
        if not engine.alive:
            server.should_exit = True
            return
        time.sleep(0.5)
