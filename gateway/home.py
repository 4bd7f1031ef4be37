"""A gateway's own directory (GWDIR), written by `iomtca gateway init` and read by `gateway run`.

    GWDIR/gateway.toml        [gateway] settings: name, ca_url, broker, ... (written last by init)
    GWDIR/ra.pem              the RA certificate and its issuing CA
    GWDIR/root.pem            the trust anchor: the CA's root, as given to `gateway init --root`
    GWDIR/gateway.db          the durable inbox, outbox and idempotency record
    GWDIR/private/ra.key      the RA key, encrypted with the gateway's passphrase (0600)
    GWDIR/private/passphrase  that passphrase (0600), unless $IOMTCA_GATEWAY_PASSPHRASE is set

A GWDIR never holds a CA key, the CA's passphrase or the CA database, and the gateway refuses to
run from a directory that does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ConfigError
from common.keyfiles import GATEWAY_PASSPHRASE_ENV, read_secret

# What marks a CA directory (`iomtca init`): its config, its keys, its database.
CA_MARKERS = ("config.toml", "iomtca.db", "private/issuing.key", "private/root.key", "issuing.pem")


@dataclass(frozen=True)
class GatewayHome:
    home: Path
    config: Path = field(init=False)
    ra_cert: Path = field(init=False)
    root_cert: Path = field(init=False)
    database: Path = field(init=False)
    private: Path = field(init=False)
    ra_key: Path = field(init=False)
    passphrase: Path = field(init=False)

    def __post_init__(self) -> None:
        h = Path(self.home)
        values = dict(home=h, config=h / "gateway.toml", ra_cert=h / "ra.pem", root_cert=h / "root.pem",
                      database=h / "gateway.db", private=h / "private", ra_key=h / "private" / "ra.key",
                      passphrase=h / "private" / "passphrase")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def ca_markers(self) -> list[str]:
        return [m for m in CA_MARKERS if (self.home / m).exists()]

    def refuse_ca_directory(self) -> None:
        found = self.ca_markers()
        if found:
            raise ConfigError(f"{self.home} is a CA directory ({', '.join(found)}): a gateway never runs beside the "
                              "CA's keys; set it up in its own directory with `iomtca gateway init --dir GWDIR`")

    def check_ready(self) -> None:
        """For `gateway run`: a directory `gateway init` completed, and no CA directory."""
        self.refuse_ca_directory()
        if not self.config.exists():
            raise ConfigError(f"{self.home} is not a gateway directory (no gateway.toml); set it up with "
                              "`iomtca gateway init --dir GWDIR --ca URL --root ROOT.pem --name NAME --token -`")

    def read_passphrase(self) -> bytes:
        """The gateway's own passphrase (of ra.key): $IOMTCA_GATEWAY_PASSPHRASE, else private/passphrase."""
        return read_secret(GATEWAY_PASSPHRASE_ENV, self.passphrase, "gateway passphrase")
