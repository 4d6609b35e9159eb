"""Running uvicorn servers: in a background thread, and with an RA-TLS certificate held in memory.

Every enclaveml server (inference, FL aggregator, vertical-FL server, the demo's key broker) and
the tests start uvicorn the same way, so it lives here once:

- :func:`start_in_thread` runs a ``uvicorn.Config`` in a daemon thread, waits until the socket
  listens (or the thread dies, or the start-up timeout passes) and returns a :class:`ServerThread`;
- :func:`uvicorn_config` builds the config of an RA-TLS server: certificate and private key are
  handed to uvicorn through anonymous memory files (``memfd``), never a path on disk, and the
  connections get a deadline for each request head and for a response the client leaves unread
  (:class:`~enclaveml._web._protocol.DeadlineHttpProtocol`);
- :func:`attestation_hook` is the ``/attestation?nonce=`` handler of every RA-TLS server: fresh
  evidence bound to the client's nonce and the server's TLS key;
- :func:`serve_ratls_app` puts the three together and returns a :class:`RunningServer`;
- :func:`raise_open_file_limit` lifts the process's soft limit on open files to its hard limit
  (as nginx's ``worker_rlimit_nofile``): the common default of 1024 lets a thousand slow clients
  take every connection a server can hold; :func:`uvicorn_config` calls it.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cbor2
import uvicorn
from fastapi import FastAPI

from enclaveml._urls import url_host
from enclaveml._web._protocol import DeadlineHttpProtocol
from enclaveml.attestation import EvidenceProvider, RatlsCertificate
from enclaveml.attestation.ratls import bind_public_key
from enclaveml.attestation.tls import in_memory_key_files
from enclaveml.errors import ConfigurationError

__all__ = [
    "RunningServer",
    "ServerThread",
    "attestation_hook",
    "raise_open_file_limit",
    "serve_ratls_app",
    "start_in_thread",
    "uvicorn_config",
]


@dataclass
class ServerThread:
    """A uvicorn server running in a daemon thread of this process; ``stop()`` shuts it down."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    config: uvicorn.Config,
    *,
    name: str,
    sock: socket.socket | None = None,
    startup_timeout: float = 30.0,
) -> ServerThread:
    """Serve ``config`` in a thread named ``name``; return once it listens.

    ``sock`` is an already bound socket to serve on (its port is known before the start);
    otherwise uvicorn binds ``config.host:config.port`` itself (port 0: an ephemeral one).

    :raises ConfigurationError: the server stopped or did not listen within ``startup_timeout``.
    """
    server = uvicorn.Server(config)
    kwargs = {"sockets": [sock]} if sock is not None else {}
    thread = threading.Thread(target=server.run, kwargs=kwargs, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigurationError(f"{name} did not start on {config.host}:{config.port}")
        time.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    scheme = "https" if config.ssl_certfile or config.ssl_keyfile else "http"
    return ServerThread(f"{scheme}://{url_host(host)}:{port}", server, thread)


_log = logging.getLogger(__name__)
_MAX_OPEN_FILES = 1 << 20  # where the hard limit is unlimited (the kernel's default nr_open)


def raise_open_file_limit() -> int:
    """Raise ``RLIMIT_NOFILE``'s soft limit to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open
            _log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft
        return target
    return soft


@contextlib.contextmanager
def uvicorn_config(
    app: FastAPI, ratls: RatlsCertificate, *, host: str, port: int
) -> Iterator[uvicorn.Config]:
    """A uvicorn config serving ``app`` with the RA-TLS certificate; the key stays in memory files."""
    raise_open_file_limit()
    with in_memory_key_files(ratls.certificate_pem, ratls.private_key_pem()) as (certfile, keyfile):
        yield uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            loop="uvloop",
            http=DeadlineHttpProtocol,
            timeout_graceful_shutdown=30,  # then running requests are cancelled, connections dropped
            log_level="warning",
            access_log=False,
        )


def attestation_hook(provider: EvidenceProvider, ratls: RatlsCertificate) -> Callable[[bytes], bytes]:
    """The ``/attestation`` handler: fresh evidence bound to the client's nonce and the TLS key.

    The answer is CBOR ``{"evidence": bstr, "endorsements": bstr / null}``, the encoding of
    :func:`enclaveml.attestation.ratls.bind_public_key` that the clients verify.
    """
    public_key = ratls.private_key.public_key()

    def hook(nonce: bytes) -> bytes:
        binding = bind_public_key(provider, public_key, nonce=nonce)
        return bytes(cbor2.dumps({"evidence": binding.evidence, "endorsements": binding.endorsements}))

    return hook


@dataclass
class RunningServer:
    """An RA-TLS server started by :func:`serve_ratls_app`; ``stop()`` shuts it down."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    ratls: RatlsCertificate
    app: FastAPI
    _exit: contextlib.ExitStack = field(repr=False)
    _stopping: list[Callable[[], object]] = field(default_factory=list, repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        for callback in self._stopping:
            callback()
        self.server.should_exit = True
        self.thread.join(timeout)
        self._exit.close()

    def before_stop(self, callback: Callable[[], object]) -> None:
        """Have :meth:`stop` call ``callback`` first, before the server drains its requests (so that
        work the requests wait on, such as a job's long-polls, ends instead of being waited out)."""
        self._stopping.append(callback)

    def on_stop(self, callback: Callable[[], object]) -> None:
        """Have :meth:`stop` call ``callback`` once the server has stopped serving."""
        self._exit.callback(callback)


def serve_ratls_app(
    app: FastAPI,
    ratls: RatlsCertificate,
    *,
    name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 30.0,
) -> RunningServer:
    """Serve ``app`` over TLS with ``ratls`` in a background thread (tests, the demo, embedding)."""
    stack = contextlib.ExitStack()
    try:
        config = stack.enter_context(uvicorn_config(app, ratls, host=host, port=port))
        running = start_in_thread(config, name=name, startup_timeout=startup_timeout)
    except BaseException:
        stack.close()
        raise
    port = int(running.url.rsplit(":", 1)[1])
    return RunningServer(
        f"https://{url_host(host)}:{port}", running.server, running.thread, ratls, app, stack
    )
