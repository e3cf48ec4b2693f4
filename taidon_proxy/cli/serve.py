"""`sqlrs serve`: run the proxy in the foreground until SIGINT/SIGTERM, then shut down cleanly."""

from __future__ import annotations

import asyncio
import signal

import structlog

from taidon_proxy.app import Proxy
from taidon_proxy.config import Config

log = structlog.get_logger("taidon.serve")


async def serve(config: Config) -> None:
    proxy = await Proxy.open(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, proxy.request_stop)
    try:
        await proxy.start()
        log.info(
            "proxy.ready",
            listen=proxy.server.addresses if proxy.server else [],
            admin=proxy.admin.address if proxy.admin else None,
        )
        await proxy.stop_requested.wait()  # a signal, or an admin drain that finished
        log.info("proxy.stopping")
    finally:
        await proxy.close()
        log.info("proxy.stopped")


def run(config: Config, *, loop: str = "uvloop") -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(serve(config))
    else:
        asyncio.run(serve(config))
