"""iomt-ca domain core: issuance, revocation, CRL, OCSP, device registry and storage."""
