"""The background drawer (reporting.drawing): the run goes on while figures are drawn, finish() waits for them,
a newer figure of a file replaces one not yet drawn, and a failing figure is logged without stopping the others."""
import threading

from effnet_exp.reporting.drawing import Drawer


def test_jobs_run_in_the_background_in_order_and_finish_waits():
    drawer, release, done = Drawer(), threading.Event(), []
    drawer.submit("a", lambda: (release.wait(10), done.append(("a", threading.current_thread().name))))
    drawer.submit("b", lambda: done.append(("b", threading.current_thread().name)))
    assert done == []  # the caller was not held up: "a" waits for the event
    release.set()
    drawer.finish()
    assert [key for key, _ in done] == ["a", "b"]
    assert {name for _, name in done} == {"effnet-exp-drawing"}


def test_a_newer_job_of_the_same_key_replaces_the_pending_one():
    drawer, release, done = Drawer(), threading.Event(), []
    drawer.submit("busy", release.wait, 10)
    drawer.submit("curves.png", done.append, "old")
    drawer.submit("other.png", done.append, "other")
    drawer.submit("curves.png", done.append, "new")
    release.set()
    drawer.finish()
    assert done == ["other", "new"]


def test_a_failing_job_is_logged_and_the_next_still_drawn(caplog):
    drawer, done = Drawer(), []

    def broken():
        raise ValueError("no such font")

    drawer.submit("broken.png", broken)
    drawer.submit("fine.png", done.append, "fine")
    drawer.finish()
    assert done == ["fine"]
    assert "could not draw broken.png: ValueError: no such font" in caplog.text


def test_finish_discard_drops_what_has_not_started_and_a_later_job_starts_a_new_worker():
    drawer, started, release, done = Drawer(), threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(10)
        done.append("slow")

    drawer.submit("slow.png", slow)
    drawer.submit("later.png", done.append, "later")
    started.wait(10)
    threading.Timer(0.2, release.set).start()
    drawer.finish(discard=True)
    assert done == ["slow"]  # the running job completes (its file is written whole); the pending one is dropped
    drawer.submit("again.png", done.append, "again")
    drawer.finish()
    assert done == ["slow", "again"]
