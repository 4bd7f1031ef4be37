"""`iomtca gateway run --dir GWDIR`: wire the MQTT link, the RA client and the durable store, and run until
signalled. GWDIR is the gateway's own directory (`gateway/home.py`, made by `iomtca gateway init`)."""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from cryptography import x509

from common.timefmt import utc_now

from .config import GatewayConfig, load_gateway_config
from .durable import Durable
from .home import GatewayHome
from .mqtt import MQTTLink
from .broker_control import BrokerControl
from .pki import PKIPublisher
from .ra_client import RAClient
from .ra_identity import RAIdentity
from .service import GatewayService
from .supervise import Supervisor
from .topics import Topics, shared

log = logging.getLogger(__name__)


def subscriptions(config: GatewayConfig) -> list[str]:
    topics = Topics(config.topic_root)
    filters = (topics.requests_filter, topics.presence_filter, topics.posture_filter)
    return [shared(config.share_group, f) if config.share_group else f for f in filters]


async def run_gateway(home: Path, *, broker: str | None = None, ca_url: str | None = None,
                      client_id: str | None = None, publish_pki: bool | None = None,
                      share_group: str | None = None, **broker_options: Path | str | None) -> None:
    paths = GatewayHome(Path(home).absolute())
    paths.check_ready()   # its own directory, set up by `gateway init`; never a CA directory
    config = load_gateway_config(paths, broker=broker, ca_url=ca_url, client_id=client_id,
                                 publish_pki=publish_pki, share_group=share_group, **broker_options)
    passphrase = paths.read_passphrase()   # the gateway's own, never the CA's
    identity = RAIdentity.in_home(paths, passphrase)
    ra_context = identity.client_context()
    durable = await Durable.open(config.database, owner=config.client_id)
    link = MQTTLink(config.broker, config.client_id, subscriptions(config), manual_ack=True, auth=config.broker_auth)
    released = await durable.release_claims()
    if released:
        log.info("took back %d request(s) this gateway was forwarding when it stopped", released)
    supervisor = Supervisor()
    async with RAClient(config.ca_url, ra_context) as ra:
        control = BrokerControl.for_gateway(config, ra)   # None unless [gateway] broker_control is set
        pki = PKIPublisher(config, link, ra, durable, issuer=_issuer(paths),
                           broker_control=control) if config.publish_pki else None
        service = GatewayService(config, link, ra, durable, on_issued=pki.certificate_issued if pki else None)
        try:
            await link.start()
            # every long-running task is supervised: one that dies is logged and restarted with
            # backoff; no error from the CA, the broker or a payload stops the gateway
            supervisor.start("intake", service.run_intake)
            supervisor.start("forwarders", service.run_forwarders)
            supervisor.start("reports", service.run_reporter)
            supervisor.start("housekeeping", lambda: _housekeeping(durable, config))
            supervisor.start("ra-renewal", lambda: identity.run_renewal(ra))
            if pki is not None:
                supervisor.start("pki", pki.run)
            if control is not None:
                supervisor.start("broker-control", control.run)
            await link.connected.wait()
            print(f"iomtca gateway: connected broker={config.broker} ca={config.ca_url} "
                  f"client_id={config.client_id} name={config.name}", flush=True)
            await _until_signalled()
        finally:
            await supervisor.stop()
            await link.stop()
            await durable.close()


def _issuer(paths: GatewayHome) -> x509.Certificate | None:
    """The issuing CA certificate (second in ra.pem): CRLs and OCSP responses are published only
    if signed by it (or, for OCSP, by a responder it authorised). None: they are only parsed."""
    try:
        return x509.load_pem_x509_certificates(paths.ra_cert.read_bytes())[1]
    except (OSError, ValueError, IndexError) as exc:
        log.warning("no issuing CA certificate in %s (%s): CRLs and OCSP responses are only parsed before publishing",
                    paths.ra_cert, exc)
        return None


async def _housekeeping(durable: Durable, config: GatewayConfig) -> None:
    while True:
        await asyncio.sleep(3600)
        removed = await durable.expire(utc_now(), config.answer_ttl)
        if removed:
            log.info("forgot %d answered requests older than %s", removed, config.answer_ttl)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
