"""Waiting for something the daemon does after a reply (a hook, a commit, an unload)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Awaitable, Callable


async def until(cond: Callable[[], Any | Awaitable[Any]], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``cond`` (plain or async) until it is truthy, and return its value. The bound
    only keeps a broken daemon from hanging the run: far beyond any slow machine."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        got = cond()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
