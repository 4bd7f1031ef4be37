"""Application factories: the HTTPS app (EST, RA API, and the responders) and the plain-HTTP
responder app (OCSP and CRL only, as RFC 5280 and RFC 6960 relying parties expect)."""
from __future__ import annotations

from concurrent.futures import Executor

from aiohttp import web

from ca import failures
from ca.authority import Authority

from . import est, gateway_enroll, idevid_crl, metrics, posture, ra, ra_service, responder
from .config import EnrollConfig
from .middleware import body_deadline, errors
from .publication import Publisher
from .state import AUTHORITY, CONFIG, KEYGEN, PUBLISHER


def _base(authority: Authority, config: EnrollConfig, publisher: Publisher, middlewares) -> web.Application:
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body)
    app[AUTHORITY] = authority
    app[CONFIG] = config
    app[PUBLISHER] = publisher
    return app


def create_app(authority: Authority, config: EnrollConfig, publisher: Publisher, keygen: Executor) -> web.Application:
    app = _base(authority, config, publisher, [metrics.instrument("est", edge="est"), errors,
                                               body_deadline(config.connections.body_timeout), ra.ra_only])
    app[KEYGEN] = keygen
    # [enroll] device_source_failures and source_failures (ca/failures.py)
    authority.failure_limits = failures.Limits(config.device_source_failures, config.source_failures)
    est.add_routes(app)
    ra.add_routes(app)
    ra_service.add_routes(app)
    posture.add_routes(app)
    gateway_enroll.add_routes(app)
    responder.add_routes(app)
    idevid_crl.start(app, config)   # manufacturer CRLs: fetched before listening, then kept fresh
    return app


def create_responder_app(authority: Authority, config: EnrollConfig, publisher: Publisher) -> web.Application:
    app = _base(authority, config, publisher, [metrics.instrument("http"), errors,
                                               body_deadline(config.connections.body_timeout)])
    responder.add_routes(app)
    metrics.add_routes(app)   # /metrics, /healthz, /readyz: the listener a monitoring system reaches
    return app
