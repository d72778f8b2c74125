"""The one bounded wait, on a fake clock (no test sleeps)."""

import pytest

from fedbridge_shared.polling import wait_until


class Clock:
    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_returns_the_first_truthy_value_polling_every_interval():
    clock, calls = Clock(), []

    def ready():
        calls.append(clock.now)
        return "up" if clock.now >= 1.0 else None

    assert wait_until(ready, timeout=10, interval=0.5, clock=clock, sleep=clock.sleep) == "up"
    assert calls == [0.0, 0.5, 1.0]


def test_gives_the_last_falsy_value_at_the_deadline_checking_once_more_there():
    clock, calls = Clock(), []

    def never():
        calls.append(clock.now)
        return 0

    assert wait_until(never, timeout=1.2, interval=0.5, clock=clock, sleep=clock.sleep) == 0
    assert calls == [0.0, 0.5, 1.0, 1.2] and clock.now == 1.2  # the last sleep is cut short


def test_a_zero_timeout_still_asks_once_and_an_exception_ends_the_wait():
    clock = Clock()
    assert wait_until(lambda: True, timeout=0, interval=1, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []

    def dies():
        raise ProcessLookupError("gone")

    with pytest.raises(ProcessLookupError):
        wait_until(dies, timeout=5, interval=1, clock=clock, sleep=clock.sleep)
