"""dask.distributed clients of the ``scheduler`` settings (``extract_run.scheduler``, ``train.scheduler``).

Both settings take the same values (checked by ``featcache.pipeline.params.extract.check_scheduler``):
``none`` (no dask), ``local`` (a ``LocalCluster`` of this machine's cores, started and closed by
:class:`ClientHandle`) or a scheduler's address (``tcp://host:8786``: :func:`connect_client`, which names the
setting when nothing answers).
``distributed`` is imported only when a client is made.
"""

from __future__ import annotations

import logging
from typing import Any

from featcache.errors import ExtractionError, UserError

__all__ = ["CONNECT_TRIES", "ClientHandle", "connect_client"]

logger = logging.getLogger(__name__)

#: Tries of dask's client handshake with a running scheduler. The scheduler batches its ``stream-start`` reply with
#: whatever it broadcasts to all clients in the next 2 ms, and distributed's ``Client`` asserts that the first read
#: holds exactly one message: with other clients busy on the same scheduler, connecting then fails now and then
#: with a bare ``AssertionError`` (seen twice in this suite, connecting while another client used the scheduler).
CONNECT_TRIES = 3


def connect_client(address: str, tries: int = CONNECT_TRIES, setting: str = "extract_run.scheduler",
                   error: type[UserError] = ExtractionError) -> Any:
    """A ``distributed.Client`` connected to the scheduler at ``address``, retrying dask's handshake race.

    Parameters
    ----------
    address : str
        The scheduler's address, e.g. ``tcp://10.0.0.5:8786``.
    tries : int
        Handshakes tried before the last ``AssertionError`` is raised.
    setting : str
        The param that named ``address`` (named in the error).
    error : type
        The :class:`~featcache.errors.UserError` raised when nothing answers.

    Returns
    -------
    distributed.Client

    Raises
    ------
    UserError
        ``error``: no scheduler answers at ``address`` (refused, timed out, unknown host): the message names the
        setting, the address, dask's reason and what to do, instead of distributed's traceback.
    """
    from distributed import Client

    for attempt in range(1, tries + 1):
        try:
            return Client(address)
        except AssertionError as exc:  # dask's handshake check; anything else (timeouts, refused) is raised
            if attempt == tries:
                raise
            logger.warning("dask scheduler %s: the client handshake failed (%r, a race in distributed's Client when "
                           "the scheduler is busy); connecting again (%d/%d)", address, exc, attempt + 1, tries)
        except OSError as exc:
            raise error(
                f"Cannot connect to the dask scheduler at {setting}={address!r}: {exc}. Hint: start "
                f"one there (`dask scheduler`, then `dask worker {address}` on each machine), check the host and "
                f"port, or set {setting}: local for a cluster of this machine's cores (none: no dask)."
            ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


class ClientHandle:
    """A dask client plus what must be closed afterwards (only what we opened).

    Parameters
    ----------
    client : distributed.Client or None
        Use this client (never closed here).
    scheduler_address : str or None
        Otherwise connect to this scheduler (:func:`connect_client`, with ``setting`` and ``error``).
    n_workers, threads_per_worker : int
        Otherwise start a ``LocalCluster`` of ``n_workers`` processes of ``threads_per_worker`` threads.
    setting : str
        The param that chose the scheduler, for :func:`connect_client`'s message.
    error : type
        What :func:`connect_client` raises when nothing answers.
    """

    def __init__(self, client: Any, scheduler_address: str | None, n_workers: int, threads_per_worker: int,
                 setting: str = "extract_run.scheduler", error: type[UserError] = ExtractionError) -> None:
        from distributed import Client, LocalCluster

        self.cluster = None
        self.owned = client is None
        if client is not None:
            self.client = client
        elif scheduler_address is not None:
            logger.info("connecting to dask scheduler %s", scheduler_address)
            self.client = connect_client(scheduler_address, setting=setting, error=error)
        else:
            logger.info("starting a LocalCluster: %d worker processes x %d threads", n_workers, threads_per_worker)
            self.cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                                        dashboard_address=":0")
            try:
                self.client = Client(self.cluster)
            except BaseException:  # the cluster's worker processes would outlive us: nobody else can close them
                self.cluster.close()
                self.cluster = None
                raise

    def close(self) -> None:
        """Close the client and the cluster we started (idempotent; never a given client)."""
        if self.owned:
            client, self.owned = self.client, False
            try:
                client.close()
            finally:
                if self.cluster is not None:
                    self.cluster.close()
                    self.cluster = None
