"""The actor engine's same-node channel (tuneguard.training.actors.channel) without Ray: shared
buffers both ends see, the step's numbers through the eventfd, the actor's errors, a hung or dead
actor as ChannelBroken, and connections that do not know the key refused."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
import torch

from tuneguard.training.actors import channel as ch

pytestmark = pytest.mark.skipif(not ch.supported(), reason="needs Linux (memfd, eventfd, SCM_RIGHTS)")


def writer(bufs: ch.SharedBuffers, spec: dict, step: tuple[int, int, bool]):
    """What a worker actor does, reduced: read theta, write its row of rows[w], its means."""
    t, w, prev = step
    i = spec["index"]
    before = float(bufs.rows[1 - w][i, 0]) if prev else 0.0
    bufs.rows[w][i].copy_(bufs.theta * (i + 1) + before)
    bufs.means[i, 0].fill_(t)
    if spec.get("fail_at") == t:
        raise ValueError(f"bad input at step {t}")
    if spec.get("sleep_at") == t:
        time.sleep(3)
    return t, w, prev


def listeners(k: int) -> list[ch.ChannelListener]:
    return [ch.ChannelListener(writer, threading.RLock()) for _ in range(k)]


def test_steps_go_through_shared_buffers_both_ends_see():
    geometry = ch.Geometry(d=4, n=3, a=2)
    actors = listeners(2)
    c = ch.Channel(geometry, [a.address for a in actors], [{"index": 0}, {"index": 1}], timeout_s=10)
    try:
        assert c.buffers.rows[0].shape == (3, 4) and c.buffers.means.shape == (2, 2, 4)
        # the step's numbers survive the eventfd encoding, large t included
        for t, prev in [(0, False), (1, True), (2, True), (2**40 + 3, True)]:
            w = t % 2
            c.buffers.theta.copy_(torch.arange(4.0) + t)
            for i in range(2):
                c.go(i, t, w, prev)
            assert [c.recv(i) for i in range(2)] == [(t, w, prev)] * 2
            # written by the actors into the server's mapping; the other buffer read as momentum
            assert torch.equal(c.buffers.means[:, 0, 0], torch.tensor([float(t)] * 2))
            for i in range(2):
                expect = (torch.arange(4.0) + t) * (i + 1)
                if prev:
                    expect += float(c.buffers.rows[1 - w][i, 0])
                assert torch.equal(c.buffers.rows[w][i], expect)
            assert all(x is not None and x[0] <= x[1] <= x[2] <= x[3] for x in c.last_times)
    finally:
        c.close()
    c.close()  # idempotent


def test_an_error_in_the_actor_comes_back_with_its_traceback_and_the_channel_goes_on():
    [actor] = listeners(1)
    c = ch.Channel(ch.Geometry(2, 1, 1), [actor.address], [{"index": 0, "fail_at": 1}], timeout_s=10)
    try:
        c.go(0, 0, 0, False)
        c.recv(0)
        c.go(0, 1, 1, True)
        with pytest.raises(ch.ChannelError, match=r"(?s)Traceback.*ValueError: bad input at step 1"):
            c.recv(0)
        c.go(0, 2, 0, True)
        assert c.recv(0) == (2, 0, True)
    finally:
        c.close()


def test_a_hung_actor_is_a_broken_channel_after_the_timeout():
    [actor] = listeners(1)
    c = ch.Channel(ch.Geometry(2, 1, 1), [actor.address], [{"index": 0, "sleep_at": 0}], timeout_s=0.5)
    try:
        c.go(0, 0, 0, False)
        start = time.monotonic()
        with pytest.raises(ch.ChannelBroken, match="no answer within 0.5 s"):
            c.recv(0)
        assert time.monotonic() - start < 2.5
    finally:
        c.close()


def _serve_in_child(conn) -> None:
    actor = ch.ChannelListener(writer, threading.RLock())
    conn.send(actor.address)
    time.sleep(120)


def test_a_dead_actor_is_a_broken_channel_at_once():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_in_child, args=(child,), daemon=True)
    proc.start()
    try:
        address = parent.recv()
        c = ch.Channel(ch.Geometry(2, 1, 1), [address], [{"index": 0}], timeout_s=60)
        c.go(0, 0, 0, False)
        assert c.recv(0) == (0, 0, False)
        proc.kill()
        proc.join(10)
        start = time.monotonic()
        with pytest.raises(ch.ChannelBroken):
            c.go(0, 1, 1, True)
            c.recv(0)
        assert time.monotonic() - start < 5  # EOF, not the 60 s timeout
        c.close()
    finally:
        proc.kill()


def test_a_connection_without_the_key_is_refused_and_the_listener_serves_on():
    [actor] = listeners(1)
    path, _ = actor.address
    with pytest.raises(AuthenticationError):
        Client(path, family="AF_UNIX", authkey=b"not the key")
    c = ch.Channel(ch.Geometry(2, 1, 1), [actor.address], [{"index": 0}], timeout_s=10)
    try:
        c.go(0, 5, 1, False)
        assert c.recv(0) == (5, 1, False)
    finally:
        c.close()
