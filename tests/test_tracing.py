"""The lock between tracing a model and running models in other threads."""

import threading

import pytest

from bitsweep.tracing import TRACING, SharedLock, uses_models


def test_exclusive_keeps_other_threads_out_and_lets_its_owner_back_in():
    lock, entered = SharedLock(), threading.Event()

    def reader():
        with lock.shared():
            entered.set()

    with lock.exclusive():
        with lock.exclusive(), lock.shared():  # the owner re-enters: no deadlock
            pass
        thread = threading.Thread(target=reader)
        thread.start()
        assert not entered.wait(0.3), "a shared holder got in during exclusive()"
    assert entered.wait(5)
    thread.join()


def test_a_shared_holder_takes_shared_again_while_an_exclusive_waits():
    """A step holding shared() calls a helper that takes it too, while another thread queues for
    exclusive(): without re-entry the helper would wait behind the queued thread, which waits for it."""
    lock, queued, done = SharedLock(), threading.Event(), threading.Event()

    def writer():
        queued.set()
        with lock.exclusive():
            done.set()

    with lock.shared():
        thread = threading.Thread(target=writer)
        thread.start()
        queued.wait(5)
        while not lock._queued:  # the writer is waiting for exclusive()
            threading.Event().wait(0.01)
        with lock.shared():
            assert not done.is_set()
    assert done.wait(5)
    thread.join()


def test_exclusive_under_shared_is_refused_not_a_deadlock():
    lock = SharedLock()
    with lock.shared(), pytest.raises(RuntimeError, match="would wait for itself"):
        with lock.exclusive():
            pass
    with lock.exclusive():  # the refused call left the lock free
        pass


def test_uses_models_holds_shared_for_the_call():
    lock_free = threading.Event()

    @uses_models
    def step():
        def other():
            with TRACING.exclusive():
                lock_free.set()
        thread = threading.Thread(target=other)
        thread.start()
        assert not lock_free.wait(0.3), "exclusive() got in during a uses_models call"
        return thread

    thread = step()
    assert lock_free.wait(5)
    thread.join()
