"""Bounded waiting in asyncio tests."""
import asyncio


async def until(pred, what, seconds: float) -> None:
    """Returns once pred() is true; fails after `seconds`, which only a
    broken program takes, however busy the machine. `what` names what it
    waits for: a string, or a function that says it as the wait fails."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not pred():
        if loop.time() > deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {seconds:.2f}s waiting for {what}")
        await asyncio.sleep(0.002)
