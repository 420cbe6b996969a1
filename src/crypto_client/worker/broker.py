"""kombu's Redis transport, made to survive a Redis restart with a task in flight.

A worker that loses Redis while it holds an unacknowledged message (a tick running, with
`task_acks_late`) and has a BRPOP outstanding died with
`Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")`:

1. Celery's `Consumer.on_connection_error_after_connected` calls `Connection.collect()`. Its
   close of the task channel stops at the first step, draining the outstanding BRPOP
   (kombu/transport/redis.py:1894, `Channel.close` -> `_brpop_read`), with a connection error
   that `maybe_close_channel` swallows. Then `_do_close_transport` sets the transport's `client` (the
   `kombu.Connection`) to None, while the half-closed channel still points at the transport.
2. Celery's next `connection.close()` closes that channel again: kombu's
   `virtual.Channel.close` restores the unacknowledged message (`QoS.restore_unacked`), which
   builds a connection pool from `Channel._connparams` (kombu 5.7.0,
   kombu/transport/redis.py:1957-1959: `conninfo = self.connection.client`, then
   `conninfo.hostname`). The client is None: an AttributeError, not one of the
   `connection_errors` that `ignore_errors` and Celery's reconnect loop expect, so it ended
   the worker.

kombu issues #582 and #970 are the same dereference on other close paths; upstream's typed
`_connparams` raises TypeError("Transport client must be set") there instead, which ends the
worker the same way. Here a channel of a closed connection raises a redis `ConnectionError`
instead: the broker cannot be reached through it, and it is the error that kombu and Celery
already handle by reconnecting. The message stays in Redis's unacked set and is delivered
again after the visibility timeout; the slot claim and ON CONFLICT writes make the rerun
harmless.
"""

from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError("the channel's broker connection is closed")
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[misc]
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


def use_for_redis_urls() -> None:
    """Make `redis://` and `rediss://` broker URLs use this transport, in this process.

    The URL's scheme still names the transport, so kombu's handling of `rediss://` (TLS)
    is unchanged; call it before the first broker connection is made (kombu caches the
    class it resolves for a name).
    """
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
