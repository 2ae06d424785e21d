"""Deadline and Ticker on their own: which limit expires, the shared ticker's bookkeeping, and a client's cancel
winning over a timeout that fires at the same moment."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.upstream.deadline import Deadline, DeadlineExpired, Ticker


async def run_until_expired(deadline: Deadline, touch_every: float | None = None) -> DeadlineExpired:
    loop = asyncio.get_running_loop()

    async def body() -> None:
        async with deadline:
            while True:
                await asyncio.sleep(touch_every or 10)
                deadline.touch(loop.time())

    with pytest.raises(DeadlineExpired) as raised:
        await asyncio.wait_for(body(), 5)
    return raised.value


async def test_first_byte_then_idle_then_total_each_named_with_its_seconds():
    ticker = Ticker(tick=0.01)
    first = await run_until_expired(Deadline(ticker, first_byte=0.05, idle=10))
    assert (first.reason, first.seconds, str(first)) == ("first_byte", 0.05, "first_byte timeout after 0.05s")

    idle = Deadline(ticker, first_byte=10, idle=0.05, total=30)
    loop = asyncio.get_running_loop()

    async def one_byte_then_silence() -> None:
        async with idle:
            idle.touch(loop.time())  # a byte: from now on the idle limit applies, not the first-byte one
            await asyncio.sleep(10)

    with pytest.raises(DeadlineExpired) as raised:
        await asyncio.wait_for(one_byte_then_silence(), 5)
    assert (raised.value.reason, raised.value.seconds) == ("idle", 0.05)  # not "total": 30 s are far off

    total = await run_until_expired(Deadline(ticker, first_byte=10, idle=10, total=0.1), touch_every=0.01)
    assert (total.reason, total.seconds) == ("total", 0.1)
    assert ticker.active == set()  # every expired deadline left the ticker
    ticker.close()


async def test_an_unexpired_deadline_leaves_no_reason_and_raises_nothing():
    ticker = Ticker(tick=0.01)
    deadline = Deadline(ticker, first_byte=10, idle=10)
    assert deadline.reason is None and deadline.last is None
    async with deadline:
        await asyncio.sleep(0.03)
    assert deadline.reason is None and ticker.active == set()
    ticker.close()


async def test_a_closed_ticker_starts_again_for_the_next_deadline():
    ticker = Ticker(tick=0.01)
    ticker.close()
    expired = await run_until_expired(Deadline(ticker, first_byte=0.03, idle=10))
    assert expired.reason == "first_byte"
    ticker.close()


async def test_a_cancel_from_outside_at_the_same_moment_wins_over_the_timeout():
    """The ticker cancels the task for its timeout; the client's disconnect cancels it too before it runs: the
    task must see a CancelledError (the disconnect), not a DeadlineExpired."""
    ticker = Ticker(tick=10)  # expired by hand below
    deadline = Deadline(ticker, first_byte=0.01, idle=10)
    entered = asyncio.Event()

    async def body() -> None:
        async with deadline:
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await entered.wait()
    loop = asyncio.get_running_loop()
    deadline.expire(loop.time() + 1)  # what the ticker does for an overdue deadline
    task.cancel()  # and the client goes away in the same loop iteration
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadline.reason == "first_byte"
    ticker.close()


def test_expired_is_an_exception_that_keeps_its_numbers():
    exc = DeadlineExpired("idle", 2.5)
    assert (exc.reason, exc.seconds) == ("idle", 2.5) and str(exc) == "idle timeout after 2.5s"


async def test_an_expired_deadline_is_expired_once_while_its_task_cleans_up():
    """A relay's cleanup after the timeout's cancel may take several ticks (closing the upstream connection):
    the ticker must not cancel it again, or the cleanup is cut and the timeout lost."""
    ticker = Ticker(tick=0.01)
    deadline = Deadline(ticker, first_byte=0.02, idle=10)
    cleaned = False

    async def body() -> None:
        nonlocal cleaned
        async with deadline:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await asyncio.sleep(0.06)  # six ticks of cleanup
                cleaned = True
                raise

    with pytest.raises(DeadlineExpired):
        await asyncio.wait_for(body(), 5)
    assert cleaned
    ticker.close()
