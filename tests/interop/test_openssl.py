"""openssl as an independent judge of certificates, CRLs and OCSP responses.

Every certificate here is issued through the admin CLI from a CSR made by
`openssl req`; CRLs come from `iomtca crl`; OCSP requests are made by
`openssl ocsp -reqout` and answered by `Authority.ocsp` (what the HTTP listener
calls). openssl then decides whether the result is acceptable.
"""
from __future__ import annotations

import re
import secrets
from datetime import timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest_helpers_absent import *  # noqa  (placeholder removed below)
