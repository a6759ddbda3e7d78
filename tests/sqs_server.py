"""The SQS-compatible server for the test suite: moto's server, with its SQS
queue operations made atomic.

moto (5.2.1) serves each request on a thread of its own and takes no lock
around a queue's messages. Two requests at once can then do what SQS never
does: a ReceiveMessage can hand out a message another one is handing out at
the same moment, two DeleteMessage calls rebuilding the message list can put
a deleted message back, and a delete can fail with ReceiptHandleIsInvalid for
a handle SQS would take. Under load (two cores, the whole suite running) the
conformance suite's competing-consumers case saw both. Here every operation
on messages runs under one lock; a long poll waits outside it, between
attempts, so it holds nobody up.

Usage: python3 tests/sqs_server.py -H 127.0.0.1 -p 4566 (moto_server's
arguments).
"""

import inspect
import sys
import threading
import time

from moto.sqs import models
from moto.server import main

LOCK = threading.RLock()
# How long an empty long poll waits before it looks again (a new message
# wakes it at once).
POLL_INTERVAL = 0.02

backend = models.SQSBackend
EXPECTED = [
    "self",
    "queue_name",
    "count",
    "wait_seconds_timeout",
    "visibility_timeout",
    "message_attribute_names",
]
found = list(inspect.signature(backend.receive_message).parameters)
if found != EXPECTED:
    sys.exit(
        f"tests/sqs_server.py: moto's SQSBackend.receive_message takes {found}, "
        f"not {EXPECTED}; update the wrapper for this moto version"
    )


def serialized(method):
    def locked(*args, **kwargs):
        with LOCK:
            return method(*args, **kwargs)

    locked.__name__ = method.__name__
    return locked


for name in [
    "create_queue",
    "get_queue_url",
    "list_queues",
    "list_dead_letter_source_queues",
    "delete_queue",
    "purge_queue",
    "get_queue_attributes",
    "set_queue_attributes",
    "send_message",
    "send_message_batch",
    "delete_message",
    "delete_message_batch",
    "change_message_visibility",
    "change_message_visibility_batch",
]:
    method = getattr(backend, name, None)
    if method is None:
        sys.exit(f"tests/sqs_server.py: moto's SQSBackend has no {name}")
    setattr(backend, name, serialized(method))

receive_once = backend.receive_message


def receive_message(
    self,
    queue_name,
    count,
    wait_seconds_timeout,
    visibility_timeout,
    message_attribute_names=None,
):
    deadline = time.monotonic() + (wait_seconds_timeout or 0)
    while True:
        with LOCK:
            result = receive_once(
                self, queue_name, count, 0, visibility_timeout, message_attribute_names
            )
            queue = self.get_queue(queue_name)
        if result or time.monotonic() >= deadline:
            return result
        # Woken early by a new message (moto notifies on every add).
        with queue._messages_lock:
            queue._messages_lock.wait(
                timeout=min(POLL_INTERVAL, max(0.0, deadline - time.monotonic()))
            )


backend.receive_message = receive_message

if __name__ == "__main__":
    main(sys.argv[1:])
