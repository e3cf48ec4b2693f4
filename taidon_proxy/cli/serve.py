"""`sqlrs serve`: the proxy in the foreground; SIGHUP reloads the config, SIGINT/SIGTERM stop."""

from __future__ import annotations

import asyncio
import gc
import signal

import structlog

from taidon_proxy.app import Proxy
from taidon_proxy.cli.limits import check_processes, raise_open_files
from taidon_proxy.config import Config
from taidon_proxy.errors import ConfigError
from taidon_proxy.services.audit import SIGNAL

log = structlog.get_logger("taidon.serve")


async def reload_on_hangup(proxy: Proxy) -> None:
    """SIGHUP: reload; a bad file is logged with its problems and changes nothing."""
    try:
        change = await proxy.reload(actor=SIGNAL)
    except ConfigError as e:
        log.error("config.reload_refused", source=str(proxy.config.source), error=e.message)
        return
    if change.needs_restart:
        log.warning(
            "config.needs_restart",
            keys=[p.key for p in change.needs_restart],
            hint="these keep their running values until the proxy is restarted",
        )


def settle_heap() -> None:
    """What start-up made lives as long as the proxy: move it out of the collector's sight
    (each full collection walked all of it), and collect the young generation less often
    (a connection leaves a few hundred short-lived objects). Same idea as Instagram's
    `gc.freeze()` on their servers."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


GC_YOUNG = 5000  # allocations between young collections (Python's default: 700)


async def serve(config: Config) -> None:
    raise_open_files(config.instances.max)
    check_processes(config.instances.max)
    proxy = await Proxy.open(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, proxy.request_stop)
    reloads: set[asyncio.Task[None]] = set()

    def hangup() -> None:
        task = asyncio.create_task(reload_on_hangup(proxy), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        await proxy.start()
        settle_heap()
        loop.add_signal_handler(signal.SIGHUP, hangup)
        log.info(
            "proxy.ready",
            listen=proxy.server.addresses if proxy.server else [],
            admin=proxy.admin.address if proxy.admin else None,
            backend=proxy.backend_name,
            backend_reason=proxy.backend_reason,
        )
        await proxy.stop_requested.wait()  # a signal, or an admin drain that finished
        log.info("proxy.stopping")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
        await proxy.close()
        log.info("proxy.stopped")


def run(config: Config, *, loop: str = "uvloop") -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(serve(config))
    else:
        asyncio.run(serve(config))
